"""Generation sees prompts only, pads the way each family needs, and batching changes nothing."""

from __future__ import annotations

import pytest
import torch

from medassist.data import QAExample
from medassist.formatting import make_format
from medassist.generation import GenerationSettings, generate_answers, generate_from_ids
from medassist.models import load_pretrained

QUESTIONS = [
    "What is type 2 diabetes?",
    "What are the symptoms of asthma and how is it treated in children?",
    "Is flu contagious?",
    "What causes high blood pressure in adults over sixty, and can it be prevented?",
    "Hi",
]
# answers full of words the questions never use, so a leak would be visible token by token
EXAMPLES = [
    QAExample(q, f"Zygomorphic quokka xylophone {i}: the pancreas secretes glucagon, crwth fjord.", row=i + 1)
    for i, q in enumerate(QUESTIONS)
]


def diversify(model, std: float = 0.5):
    """Re-draw the weights (seeded) with a wide spread: a random tiny model otherwise repeats
    one token for every prompt, which would make 'batched equals one at a time' vacuous."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-t5"])
def lm(request):
    model, tok, family = load_pretrained(request.param)
    return diversify(model), make_format(family, tok)


class Recorder:
    """Wraps ``model.generate``: records what it is given and still generates for real."""

    def __init__(self, model):
        self.model, self.calls, self.outputs = model, [], []
        self._real = model.generate

    def __enter__(self):
        def generate(*args, **kwargs):
            assert not args, "generate must get keyword tensors"
            self.calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            out = self._real(**kwargs)
            self.outputs.append(out)
            return out

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate  # the instance attribute shadowed the class method


def test_generation_inputs_hold_no_answer_token(lm):
    from medassist.evaluation import score_model, get_bert_scorer

    model, fmt = lm
    with Recorder(model) as rec:
        score_model(model, fmt, EXAMPLES, GenerationSettings(max_new_tokens=4, batch_size=2), get_bert_scorer())
    assert rec.calls
    prompts = {tuple(fmt.prompt_ids(ex.question)): ex for ex in EXAMPLES}
    seen = 0
    for call in rec.calls:
        assert set(call) <= {"input_ids", "attention_mask", "generation_config"}  # no labels, no decoder inputs
        for ids, mask in zip(call["input_ids"], call["attention_mask"]):
            row = tuple(ids[mask.bool()].tolist())
            assert row in prompts, "every generation input is exactly the prompt of one question"
            ex = prompts[row]
            answer_only = set(fmt.tokenizer(ex.answer, add_special_tokens=False).input_ids) - set(row)
            assert answer_only, "the test answer must have tokens of its own"
            assert not answer_only & set(ids.tolist())
            seen += 1
    assert seen == len(EXAMPLES)


def test_decoder_batches_are_left_padded_and_seq2seq_right(lm):
    model, fmt = lm
    with Recorder(model) as rec:
        generate_answers(model, fmt, QUESTIONS, GenerationSettings(max_new_tokens=2, batch_size=8))
    (call,) = rec.calls
    mask = call["attention_mask"]
    assert (mask == 0).any(), "prompts of different lengths must need padding"
    assert (mask.diff(dim=1) != 0).sum(dim=1).le(1).all()  # one contiguous block of ones per row
    if fmt.family == "decoder":
        assert mask[:, -1].all(), "decoder-only: every prompt ends at the last column (left padding)"
        assert (call["input_ids"][mask == 0] == fmt.pad_id).all()
    else:
        assert mask[:, 0].all(), "encoder-decoder: sources are right-padded"


def test_batched_equals_one_at_a_time_in_input_order(lm):
    model, fmt = lm
    batched = generate_answers(model, fmt, QUESTIONS, GenerationSettings(max_new_tokens=8, batch_size=4))
    single = [generate_answers(model, fmt, [q], GenerationSettings(max_new_tokens=8, batch_size=1)) for q in QUESTIONS]
    assert batched.token_ids == [s.token_ids[0] for s in single]
    assert batched.texts == [s.texts[0] for s in single]
    assert len({tuple(t) for t in batched.token_ids}) > 1, "answers must differ for the check to mean anything"


def test_stops_at_eos_and_flags_answers_that_hit_the_limit(lm):
    model, fmt = lm
    capped = generate_answers(model, fmt, QUESTIONS[:2], GenerationSettings(max_new_tokens=3))
    assert capped.new_tokens == [3, 3] and capped.hit_max_new_tokens == [True, True]
    assert capped.mean_new_tokens == 3.0 and capped.share_hit_max_new_tokens == 1.0

    def force_eos(_module, _inputs, output):
        output.logits[..., fmt.eos_id] = 1e4

    handle = model.register_forward_hook(force_eos)
    try:
        with Recorder(model) as rec:
            stopped = generate_answers(model, fmt, QUESTIONS[:2], GenerationSettings(max_new_tokens=16))
    finally:
        handle.remove()
    assert stopped.new_tokens == [0, 0] and stopped.hit_max_new_tokens == [False, False]
    assert stopped.texts == ["", ""]
    start = rec.calls[0]["input_ids"].shape[1] if fmt.family == "decoder" else 1
    assert rec.outputs[0].shape[1] == start + 1, "generation ends at the first EOS"


def test_sampling_is_seeded_and_empty_input_is_fine(lm):
    model, fmt = lm
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    first = generate_answers(model, fmt, QUESTIONS[:2], settings)
    assert generate_answers(model, fmt, QUESTIONS[:2], settings).token_ids == first.token_ids
    assert generate_from_ids(model, fmt, []).texts == []
