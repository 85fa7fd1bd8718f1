"""Metrics match their definitions, baselines come along, and a run is scored on unseen questions."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from medassist.config import EvalConfig, load_config
from medassist.data import QAExample, question_key, read_split
from medassist.evaluation import (
    METRIC_KEYS,
    base_model_context,
    evaluate_examples,
    get_bert_scorer,
    make_training_evaluator,
    perplexity_and_accuracy,
    rouge_l,
)
from medassist.engine import Engine
from medassist.formatting import IGNORE_INDEX
from medassist.models import load_pretrained, minilm_folder

CANDIDATES = ["Insulin lets cells take up sugar from the blood.", "Asthma narrows the airways.",
              "Drink water.", ""]
REFERENCES = ["Insulin is a hormone that helps glucose enter cells.", "In asthma the airways swell and narrow.",
              "Fluids and rest help most colds.", "An empty candidate scores zero."]
EXAMPLES = [
    QAExample("What does insulin do?", "Insulin helps glucose move from the blood into cells.", row=1),
    QAExample("What is asthma?", "A long-term disease in which the airways swell and narrow.", row=2),
    QAExample("Is influenza contagious?", "Yes, it spreads through droplets when people cough.", row=3),
]


@pytest.fixture(scope="module")
def scorer():
    return get_bert_scorer("minilm-l6")


@pytest.fixture(scope="module")
def qwen():
    model, tok, family = load_pretrained("tiny-qwen3")
    return model.eval(), family.make_format(tok), family


@pytest.fixture(scope="module")
def t5():
    model, tok, family = load_pretrained("tiny-t5")
    return model.eval(), family.make_format(tok), family


# ---------------------------------------------------------------------------------------
# BERTScore
@pytest.mark.parametrize("idf", [False, True])
def test_bertscore_equals_bert_score_library(idf):
    import bert_score

    ours = get_bert_scorer("minilm-l6", idf=idf)
    filled = slice(0, 3)  # bert_score's own empty-text path fails under transformers 5
    (p, r, f), digest = bert_score.score(CANDIDATES[filled], REFERENCES[filled], model_type=str(minilm_folder()),
                                         num_layers=6, idf=idf, return_hash=True)
    mp, mr, mf = ours.score(CANDIDATES[filled], REFERENCES[filled])
    for mine, theirs in ((mp, p), (mr, r), (mf, f)):
        assert mine == pytest.approx(theirs.tolist(), abs=1e-6)
    assert ours.hash == digest
    assert ours.settings()["layer"] == 6


def test_bertscore_identity_swap_and_empty(scorer):
    p, r, f = scorer.score(REFERENCES, REFERENCES)
    assert f == pytest.approx([1.0] * len(REFERENCES), abs=1e-6)
    p1, r1, _ = scorer.score(CANDIDATES[:3], REFERENCES[:3])
    p2, r2, _ = scorer.score(REFERENCES[:3], CANDIDATES[:3])
    assert p1 == pytest.approx(r2, abs=1e-6) and r1 == pytest.approx(p2, abs=1e-6)
    assert [x[3] for x in scorer.score(CANDIDATES, REFERENCES)] == [0.0, 0.0, 0.0]


def test_rescaling_without_a_baseline_is_a_note_not_a_crash():
    rescaled = get_bert_scorer("minilm-l6", rescale=True)
    assert not rescaled.settings()["rescale_with_baseline"] and rescaled.settings()["rescale_requested"]
    assert "no rescaling baseline" in rescaled.note
    assert rescaled.score(CANDIDATES[:1], REFERENCES[:1])[2][0] > 0


def test_rouge_l():
    assert rouge_l(["the airways narrow"], ["the airways narrow"]) == [1.0]
    assert rouge_l([""], ["anything"]) == [0.0]


# ---------------------------------------------------------------------------------------
# perplexity and token accuracy
class PeakedLM(torch.nn.Module):
    """A stand-in causal LM: logit ``a`` on token ``k``, 0 elsewhere, at every position."""

    def __init__(self, vocab: int, k: int, a: float):
        super().__init__()
        self.vocab, self.k, self.a = vocab, k, a
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.k] = self.a
        return SimpleNamespace(logits=logits)


def test_perplexity_matches_a_hand_computation(qwen):
    _, fmt, family = qwen
    vocab, a = len(fmt.tokenizer), 3.0
    # the answer's first token gets the peak; a long question shows prompt tokens do not count
    answers = [ex.answer for ex in EXAMPLES]
    k = fmt.tokenizer(answers[0], add_special_tokens=False).input_ids[0]
    examples = [QAExample(ex.question * (1 + 3 * i), ex.answer, row=i) for i, ex in enumerate(EXAMPLES)]
    targets = [t for ans in answers for t in fmt.tokenizer(ans, add_special_tokens=False).input_ids + [fmt.eos_id]]
    z = math.exp(a) + vocab - 1
    nll = sum(-(a if t == k else 0.0) + math.log(z) for t in targets)
    result = perplexity_and_accuracy(PeakedLM(vocab, k, a), fmt, family, examples, batch_size=3)
    assert result["answer_tokens"] == len(targets)  # answer tokens + EOS, never prompt or padding
    # torch's float32 log-softmax over 151k logits is good to ~1e-4 nats per token
    assert math.log(result["perplexity"]) == pytest.approx(nll / len(targets), abs=2e-4)
    assert result["token_accuracy"] == pytest.approx(sum(t == k for t in targets) / len(targets))


@pytest.mark.parametrize("which", ["qwen", "t5"])
def test_perplexity_batched_equals_a_direct_forward(which, request):
    model, fmt, family = request.getfixturevalue(which)
    nll, n = 0.0, 0
    with torch.no_grad():
        for ex in EXAMPLES:  # one unpadded example at a time, straight from the model
            enc = fmt.encode(ex.question, ex.answer)
            ids = torch.tensor([enc.input_ids])
            labels = torch.tensor([enc.labels])
            if family.name == "decoder":
                prompt = len(fmt.prompt_ids(ex.question))
                logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
                nll -= sum(float(logp[i - 1, ids[0, i]]) for i in range(prompt, ids.shape[1]))
                n += ids.shape[1] - prompt
            else:
                loss = model(input_ids=ids, labels=labels).loss  # HF's own mean over target tokens
                nll += float(loss) * labels.shape[1]
                n += labels.shape[1]
    batched = perplexity_and_accuracy(model, fmt, family, EXAMPLES, batch_size=3)
    assert batched["answer_tokens"] == n
    assert batched["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    if family.name == "decoder":  # the pruned LM head gives what the full logits give
        full = perplexity_and_accuracy(model, fmt, family, EXAMPLES, batch_size=2, prune_head=False)
        assert full["perplexity"] == pytest.approx(batched["perplexity"], rel=1e-5)
        assert full["token_accuracy"] == batched["token_accuracy"]
    assert IGNORE_INDEX not in fmt.encode(EXAMPLES[0].question, EXAMPLES[0].answer).labels[-3:]


# ---------------------------------------------------------------------------------------
# the result dict, baselines, training hooks
def test_evaluate_examples_keys_and_peft_base_baseline(qwen, scorer):
    from peft import LoraConfig, get_peft_model

    model, fmt, family = qwen
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    try:
        result = evaluate_examples(Engine(peft_model, fmt, family), EXAMPLES, EvalConfig(max_new_tokens=4),
                                   base_model=base_model_context(peft_model, None), scorer=scorer)
    finally:
        peft_model.unload()
    for key in METRIC_KEYS + ("n_examples", "baselines", "settings", "examples"):
        assert key in result
    assert result["n_examples"] == 3 and len(result["examples"]) == 3
    assert {"question", "reference", "generated", "bertscore_f1"} <= set(result["examples"][0])
    assert [r["question"] for r in result["examples"]] == [ex.question for ex in EXAMPLES]
    assert result["baselines"]["base_model"]["n_examples"] == 3
    repeat = result["baselines"]["repeat_question"]
    assert repeat["perplexity"] is None and 0 < repeat["bertscore_f1"] <= 1
    assert result["settings"]["bertscore"]["hash"] == scorer.hash
    assert result["settings"]["generation"]["max_new_tokens"] == 4
    json.dumps(result)  # the report is plain JSON


def test_training_evaluator_uses_a_fixed_subset_and_restores_train_mode(t5):
    model, fmt, family = t5
    cfg = load_config(None, {"seed": 3, "eval": {"subset": 2, "max_new_tokens": 4}})
    validation = [QAExample(f"Question number {i}?", f"Answer {i}.", row=i) for i in range(6)]
    evaluate = make_training_evaluator(fmt, family, validation, cfg)
    model.train()
    first, second = evaluate(model), evaluate(model)
    assert model.training
    assert set(first) == set(METRIC_KEYS) | {"mean_generated_tokens", "hit_max_new_tokens"}
    assert first == second  # same questions, greedy, no dropout in eval mode
    model.eval()


def test_greater_is_better_follows_the_metric(tmp_path):
    from medassist.training import training_arguments

    for metric, greater in (("bertscore_f1", True), ("eval_loss", False)):
        cfg = load_config(None, {"metric_for_best_model": metric, "output_dir": str(tmp_path)})
        assert training_arguments(cfg, tmp_path, "fp32", has_eval=True).greater_is_better is greater


# ---------------------------------------------------------------------------------------
# a real run: its test split shares no question with its train split
def test_run_is_evaluated_on_questions_it_never_trained_on(tmp_path, capsys):
    from medassist.cli import main
    from medassist.training import train

    from safetensors.torch import load_file

    run = tmp_path / "run"
    result = train(load_config(None, {"model": "tiny-qwen3", "max_steps": 4, "output_dir": str(run),
                                      "eval": {"subset": 4, "max_new_tokens": 8},
                                      "metric_for_best_model": "bertscore_f1", "eval_strategy": "steps",
                                      "eval_steps": 2, "save_strategy": "steps", "save_steps": 2}))
    # the best checkpoint by BERTScore F1 (higher is better, first of equals) is what final/ holds
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    f1 = {}
    for r in logged:
        if "eval_bertscore_f1" in r:
            f1.setdefault(r["step"], r["eval_bertscore_f1"])
    assert sorted(f1) == [2, 4]
    best_step = max(f1, key=lambda s: (f1[s], -s))
    assert result.summary["best_checkpoint"].endswith(f"checkpoint-{best_step}")
    best = load_file(run / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    final = load_file(run / "final" / "adapter_model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    train_keys = {question_key(ex.question) for ex in read_split(run / "splits" / "train.jsonl")}
    test_keys = [question_key(ex.question) for ex in read_split(run / "splits" / "test.jsonl")]

    # the report written at the end of training
    written = json.loads((run / "eval_test.json").read_text())
    assert [question_key(r["question"]) for r in written["examples"]] == test_keys
    assert not train_keys & set(test_keys)
    assert "base_model" in written["baselines"] and (run / "report" / "report.html").is_file()
    assert result.report["report_html"] == str(run / "report" / "report.html")
    assert any("eval_bertscore_f1" in r and "eval_perplexity" in r and "eval_token_accuracy" in r for r in logged)

    # `medassist evaluate RUN` with the saved split, then with the split recomputed from config
    for splits_on_disk in (True, False):
        if not splits_on_disk:
            (run / "splits" / "test.jsonl").unlink()
        out = tmp_path / f"eval_{splits_on_disk}.json"
        assert main(["evaluate", "--model", str(run), "--no-baselines", "--max-new-tokens", "2", "--output", str(out),
                     "--report", str(tmp_path / "rep")]) == 0
        evaluated = [question_key(r["question"]) for r in json.loads(out.read_text())["examples"]]
        assert evaluated == test_keys and not train_keys & set(evaluated)
    printed = capsys.readouterr().out
    assert "bertscore_f1" in printed and "report:" in printed


def test_evaluate_cli_user_errors(tmp_path, capsys):
    from medassist.cli import main

    assert main(["evaluate", "--model", "tiny-qwen3", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny-qwen3", "--set", "eval.bertscore_model=tiny-t5",
                 "--limit", "1", "--max-new-tokens", "2"]) == 2
    assert "not an encoder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_report(tmp_path):
    from medassist.cli import main
    from medassist.models import PRESETS

    if not PRESETS["smollm2-135m"].available():
        pytest.skip("smollm2-135m is not installed")
    out = tmp_path / "out.json"
    assert main(["evaluate", "--model", "smollm2-135m", "--limit", "4", "--max-new-tokens", "16",
                 "--output", str(out), "--report", str(tmp_path / "rep")]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["bertscore_f1"] <= 1 and result["n_examples"] == 4
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    for name in ("report.html", "f1_distribution.png", "examples.csv"):
        assert (tmp_path / "rep" / name).is_file()
