"""The engine: generation sees prompts only, pads the way each family needs, batching changes
nothing, and one stop rule and one sampling rule hold for the batch and the streaming API.

Each test runs on the decoder-only model through continuous batching (``tiny-qwen3``), the
same model through transformers' ``generate`` (``tiny-qwen3/generate``, the path of models the
batcher does not take) and the encoder-decoder (``tiny-t5``). The batcher's own tests are in
test_batching.py.
"""

from __future__ import annotations

import pytest
import torch

from medassist.data import QAExample
from medassist.config import GenerationSettings
from medassist.engine import Engine
from medassist.models import load_pretrained
from medassist.streaming import StopText, cut_at_stop

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


_MODELS: dict[str, tuple] = {}


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-qwen3/generate", "tiny-t5"])
def lm(request):
    name = request.param.split("/")[0]
    if name not in _MODELS:
        model, tok, family = load_pretrained(name)
        _MODELS[name] = (diversify(model), family.make_format(tok), family)
    model, fmt, family = _MODELS[name]
    return Engine(model, fmt, family, batching=not request.param.endswith("/generate"))


def batched(lm) -> bool:
    """True when this engine decodes with the continuous batcher (not transformers' generate)."""
    return lm.batching and lm.batching_problem is None


class Inputs:
    """Records the token ids every forward pass of generation gets (generate's own calls, or
    the batcher's forwards)."""

    def __init__(self, lm):
        self.lm, self.ids = lm, []

    def __enter__(self):
        def hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is not None and kwargs.get("use_cache"):  # generation (perplexity runs without a cache)
                self.ids.append(ids.clone())

        self.handle = self.lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


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

    model, fmt = lm.model, lm.fmt
    answer_only = {ex.question: set(fmt.tokenizer(ex.answer, add_special_tokens=False).input_ids)
                   - set(fmt.prompt_ids(ex.question)) for ex in EXAMPLES}
    assert all(answer_only.values()), "the test answers must have tokens of their own"
    with Recorder(model) as rec, Inputs(lm) as seen:
        result = score_model(lm, EXAMPLES, GenerationSettings(max_new_tokens=4, batch_size=2), get_bert_scorer())
    generated = {t for text in result.generated for t in fmt.tokenizer(text, add_special_tokens=False).input_ids}
    in_prompts = {t for ex in EXAMPLES for t in fmt.prompt_ids(ex.question)}
    # tokens only a reference answer has (one the model itself wrote may come back as input)
    leaked = set().union(*answer_only.values()) - in_prompts - generated
    assert leaked
    assert not any(leaked & set(ids.flatten().tolist()) for ids in seen.ids)
    if batched(lm):
        assert seen.ids and not rec.calls  # the batcher's forwards are all there is
        return
    prompts = {tuple(fmt.prompt_ids(ex.question)): ex for ex in EXAMPLES}
    seen_rows = 0
    for call in rec.calls:
        assert set(call) <= {"input_ids", "attention_mask", "generation_config", "stopping_criteria"}  # no labels
        for ids, mask in zip(call["input_ids"], call["attention_mask"]):
            row = tuple(ids[mask.bool()].tolist())
            assert row in prompts, "every generation input is exactly the prompt of one question"
            assert not answer_only[prompts[row].question] & set(ids.tolist())
            seen_rows += 1
    assert seen_rows == len(EXAMPLES)


def test_decoder_batches_are_left_padded_and_seq2seq_right(lm):
    model, fmt = lm.model, lm.fmt
    if batched(lm):
        pytest.skip("the batcher pads its own way (test_batching.py)")
    with Recorder(model) as rec:
        lm.answer(QUESTIONS, GenerationSettings(max_new_tokens=2, batch_size=8))
    (call,) = rec.calls
    mask = call["attention_mask"]
    assert (mask == 0).any(), "prompts of different lengths must need padding"
    assert (mask.diff(dim=1) != 0).sum(dim=1).le(1).all()  # one contiguous block of ones per row
    if lm.family.name == "decoder":
        assert mask[:, -1].all(), "decoder-only: every prompt ends at the last column (left padding)"
        assert (call["input_ids"][mask == 0] == fmt.pad_id).all()
    else:
        assert mask[:, 0].all(), "encoder-decoder: sources are right-padded"


def test_batched_equals_one_at_a_time_in_input_order(lm):
    together = lm.answer(QUESTIONS, GenerationSettings(max_new_tokens=8, batch_size=4))
    reference = Engine(lm.model, lm.fmt, lm.family, batching=False)  # transformers' generate, one at a time
    single = [reference.answer([q], GenerationSettings(max_new_tokens=8, batch_size=1))[0] for q in QUESTIONS]
    assert [a.token_ids for a in together] == [s.token_ids for s in single]
    assert [a.text for a in together] == [s.text for s in single]
    assert len({tuple(a.token_ids) for a in together}) > 1, "answers must differ for the check to mean anything"


def test_stops_at_eos_and_flags_answers_that_hit_the_limit(lm):
    model, fmt = lm.model, lm.fmt
    capped = lm.answer(QUESTIONS[:2], GenerationSettings(max_new_tokens=3))
    assert [a.completion_tokens for a in capped] == [3, 3] and [a.finish_reason for a in capped] == ["length"] * 2

    def force_eos(_module, _inputs, output):
        output.logits[..., fmt.eos_id] = 1e4

    handle = model.register_forward_hook(force_eos)
    try:
        with Recorder(model) as rec, Inputs(lm) as seen:
            stopped = lm.answer(QUESTIONS[:2], GenerationSettings(max_new_tokens=16))
    finally:
        handle.remove()
    assert [a.completion_tokens for a in stopped] == [0, 0] and [a.finish_reason for a in stopped] == ["stop"] * 2
    assert [a.text for a in stopped] == ["", ""]
    if batched(lm):  # the two rows' prefill gives the EOS: no decoding step follows
        assert sum(ids.shape[0] == 2 for ids in seen.ids) == 1, "generation ends at the first EOS"
        return
    start = rec.calls[0]["input_ids"].shape[1] if lm.family.name == "decoder" else 1
    assert rec.outputs[0].shape[1] == start + 1, "generation ends at the first EOS"


def test_sampling_is_seeded_and_empty_input_is_fine(lm):
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    first = lm.answer(QUESTIONS[:2], settings)
    assert [a.token_ids for a in lm.answer(QUESTIONS[:2], settings)] == [a.token_ids for a in first]
    assert lm.generate([]) == []


def test_stream_equals_batch_answer(lm):
    """The streaming API (generate/chat/serve) gives the batch API's (evaluate) answer."""
    settings = GenerationSettings(max_new_tokens=8)
    batch = lm.answer(QUESTIONS[:2], settings)
    for question, want in zip(QUESTIONS[:2], batch):
        stream = lm.stream(lm.fmt.prompt_ids(question), settings)
        pieces = list(stream)
        got = stream.result()
        assert got.token_ids == want.token_ids and got.text == want.text
        assert "".join(pieces).strip() == got.text


def test_every_eos_of_the_model_stops(lm):
    """One stop rule: a second EOS id declared by the model's generation config stops too."""
    other = next(t for t in range(5, 50) if t not in lm.stop_ids)
    lm.model.generation_config.eos_token_id = [lm.fmt.eos_id, other]
    try:
        engine = Engine(lm.model, lm.fmt, lm.family, batching=lm.batching)

        def force(_module, _inputs, output):
            output.logits[..., other] = 1e4

        handle = lm.model.register_forward_hook(force)
        try:
            (answer,) = engine.answer(QUESTIONS[:1], GenerationSettings(max_new_tokens=6))
        finally:
            handle.remove()
    finally:
        lm.model.generation_config.eos_token_id = lm.fmt.eos_id
    assert other in engine.stop_ids and answer.token_ids == [] and answer.finish_reason == "stop"


def test_stop_strings_cut_the_text_in_batch_and_stream():
    assert cut_at_stop("Rest and fluids. Question: more", ["Question:"]) == ("Rest and fluids. ", True)
    assert cut_at_stop("no stop here", ["zz"]) == ("no stop here", False)
    stop = StopText(["END"])
    pieces = [stop.feed(p) for p in ["abc E", "N", "Dxyz"]] + [stop.flush()]
    assert "".join(pieces) == "abc " and stop.stopped


def test_greedy_clears_sampling_defaults_of_the_model(lm):
    lm.model.generation_config.temperature, lm.model.generation_config.top_p = 0.3, 0.5
    config = lm.generation_config(GenerationSettings(max_new_tokens=2))
    assert config.do_sample is False and config.temperature is None and config.top_p is None
    sampled = lm.generation_config(GenerationSettings(max_new_tokens=2, do_sample=True, temperature=0.7))
    assert sampled.do_sample and sampled.temperature == 0.7
    assert config.eos_token_id == lm.stop_ids
