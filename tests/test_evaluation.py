"""Metrics match their definitions, baselines come along, and a run is scored on unseen questions."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import pytest
import torch

from medassist.config import EvalConfig, load_config
from medassist.data import QAExample, question_key, read_split
from medassist.evaluation import (
    METRIC_KEYS,
    EvalResult,
    base_model_context,
    evaluate_examples,
    get_bert_scorer,
    make_training_evaluator,
    perplexity_and_accuracy,
    rouge_l,
)
from medassist.engine import Engine
from medassist.formatting import IGNORE_INDEX
from medassist.models import load_pretrained
from medassist.presets import minilm_folder

CANDIDATES = ["Insulin lets cells take up sugar from the blood.", "Asthma narrows the airways.",
              "Drink water.", ""]
REFERENCES = ["Insulin is a hormone that helps glucose enter cells.", "In asthma the airways swell and narrow.",
              "Fluids and rest help most colds.", "An empty candidate scores zero."]
EXAMPLES = [
    QAExample("What does insulin do?", "Insulin helps glucose move from the blood into cells.", row=1),
    QAExample("What is asthma?", "A long-term disease in which the airways swell and narrow.", row=2),
    QAExample("Is influenza contagious?", "Yes, it spreads through droplets when people cough.", row=3),
]


def bag_of_words(texts):
    """A stand-in question encoder: hashed word counts, L2-normalised (no model needed)."""
    import numpy as np

    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace("?", " ").split():
            out[i, sum(map(ord, word)) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


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
def test_evaluate_examples_typed_result_with_every_baseline(qwen, scorer):
    from peft import LoraConfig, get_peft_model

    model, fmt, family = qwen
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM")).eval()
    train = [QAExample("How is influenza treated?", "Rest, fluids and antiviral drugs.", row=10),
             QAExample("What causes asthma?", "Allergens and airway inflammation.", row=11)]
    examples = [QAExample(ex.question, ex.answer, ex.row, meta={"qtype": "information", "source": s})
                for ex, s in zip(EXAMPLES, ("GHR", "GHR", "CDC"))]
    try:
        result = evaluate_examples(Engine(peft_model, fmt, family), examples, EvalConfig(max_new_tokens=4),
                                   base_model=base_model_context(peft_model, None), scorer=scorer,
                                   train_examples=train, embed=bag_of_words)
    finally:
        peft_model.unload()
    assert isinstance(result, EvalResult) and result.n_examples == 3 and len(result.examples) == 3
    assert set(result.baselines) == {"base_model", "nearest_training_answer", "repeat_question"}
    assert [v.baseline for v in result.verdicts] == list(result.baselines)
    assert all(v.verdict in ("yes", "no", "can't tell") for v in result.verdicts)
    assert [r.question for r in result.examples] == [ex.question for ex in EXAMPLES]
    row = result.examples[0]
    assert {"bertscore_f1", "factual_consistency", "rouge_l", "log_perplexity"} <= set(row.scores)
    assert row.baselines["nearest_training_answer"].source_row in (10, 11)
    assert row.baselines["repeat_question"].text == EXAMPLES[0].question
    # every metric with per-example values is compared with every baseline
    compared = {(c.baseline, c.metric) for c in result.comparisons}
    assert ("base_model", "log_perplexity") in compared and ("repeat_question", "factual_consistency") in compared
    assert ("repeat_question", "log_perplexity") not in compared  # no model, no perplexity
    assert all(c.wins + c.ties + c.losses == c.n == 3 for c in result.comparisons)
    assert [g.n for g in result.breakdowns["source"]] == [2, 1]
    assert result.settings["bertscore"]["hash"] == scorer.hash
    assert result.settings["generation"]["max_new_tokens"] == 4
    data = result.to_json()
    json.dumps(data, allow_nan=False)  # plain JSON
    assert "per_example" not in data["model"] and data["bertscore_f1"] == data["model"]["bertscore_f1"]
    assert EvalResult.from_json(data).model.bertscore_f1 == result.model.bertscore_f1


def test_evaluation_merges_the_adapter_once_the_base_model_has_answered(scorer):
    """``evaluate_examples(merge=True)`` (the report after training, ``medassist evaluate``):
    the base model answers first, with the adapter switched off; then the adapter is merged
    into the weights and the model answers as ``load_for_inference`` serves it: the same base
    answers as without merging, the same model answers and perplexity as the adapter beside
    the linears, and PEFT's layers gone afterwards."""
    from peft import LoraConfig, get_peft_model

    from medassist.models import merge_adapter

    def adapted():
        model, tok, family = load_pretrained("tiny-qwen3")
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():  # B starts at zero: a trained-like B, so that the adapter changes the answers
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.05)
        return peft_model.eval(), family.make_format(tok), family

    ecfg = EvalConfig(max_new_tokens=8, retrieval_baseline=False, perplexity_precision="fp32")
    results = {}
    for merge in (False, True):
        model, fmt, family = adapted()
        results[merge] = evaluate_examples(Engine(model, fmt, family), EXAMPLES, ecfg, scorer=scorer, merge=merge,
                                           base_model=base_model_context(model, None))
        assert any("lora_" in name for name, _ in model.named_parameters()) == (not merge)
    plain, merged = results[False], results[True]
    assert merged.baselines["base_model"].generated == plain.baselines["base_model"].generated
    assert merged.model.generated != merged.baselines["base_model"].generated  # the adapter matters
    assert merged.model.generated == plain.model.generated
    assert merged.model.perplexity == pytest.approx(plain.model.perplexity, rel=1e-5)
    assert merged.baselines["base_model"].perplexity == plain.baselines["base_model"].perplexity
    assert list(merged.baselines) == list(plain.baselines)  # the report's columns keep their order
    base = load_pretrained("tiny-qwen3")[0]
    assert merge_adapter(base) is base  # no adapter: nothing to merge
    from peft import PromptTuningConfig

    prompted = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert merge_adapter(prompted) is prompted  # virtual tokens: no weights to merge


def test_per_example_log_perplexity_pools_to_the_perplexity(qwen):
    model, fmt, family = qwen
    result = perplexity_and_accuracy(model, fmt, family, EXAMPLES, batch_size=2)
    counts = [sum(t != IGNORE_INDEX for t in fmt.encode(ex.question, ex.answer).labels) for ex in EXAMPLES]
    pooled = sum(lp * n for lp, n in zip(result["log_perplexity"], counts)) / sum(counts)
    assert math.exp(pooled) == pytest.approx(result["perplexity"], rel=1e-5)
    single = [perplexity_and_accuracy(model, fmt, family, [ex])["log_perplexity"][0] for ex in EXAMPLES]
    assert result["log_perplexity"] == pytest.approx(single, rel=1e-4)  # in input order, whatever the batches


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
    assert {"base_model", "nearest_training_answer", "repeat_question"} <= set(written["baselines"])
    assert [v["baseline"] for v in written["verdicts"]] == list(written["baselines"])
    assert (run / "report" / "report.html").is_file()
    train_rows = {ex.row for ex in read_split(run / "splits" / "train.jsonl")}
    assert all(r["baselines"]["nearest_training_answer"]["source_row"] in train_rows for r in written["examples"])
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
    assert "better than the nearest training question's answer: " in printed
    assert "better than the base model: not scored (eval.baselines is false)" in printed  # --no-baselines

    # --data F --limit N: the training-overlap warning counts the N scored questions, not the file
    data_file = tmp_path / "mixed.csv"
    train_rows = read_split(run / "splits" / "train.jsonl")
    with open(data_file, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "qtype"])
        writer.writerows([ex.question, ex.answer, f"t{i % 2}"] for i, ex in enumerate(train_rows[:6]))
    out = tmp_path / "data.json"
    assert main(["evaluate", "--model", str(run), "--data", str(data_file), "--limit", "2", "--no-baselines",
                 "--max-new-tokens", "2", "--output", str(out)]) == 0
    assert "2 of the 2 scored questions are in the run's training split" in capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written["data"]["train_overlap"] == 2 and written["n_examples"] == 2
    assert [g["n"] for g in written["breakdowns"]["qtype"]] == [1, 1]
    for r in written["examples"]:  # a trained question is never answered with its own training row
        own = next(ex.row for ex in train_rows if ex.question == r["question"])
        assert r["baselines"]["nearest_training_answer"]["source_row"] != own


def test_evaluate_cli_user_errors(tmp_path, capsys):
    from medassist.cli import main

    assert main(["evaluate", "--model", "tiny-qwen3", "--data", str(tmp_path / "missing.csv")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["evaluate", "--model", "tiny-qwen3", "--set", "eval.bertscore_model=tiny-t5",
                 "--limit", "1", "--max-new-tokens", "2"]) == 2
    assert "not an encoder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# statistics: paired intervals, verdicts, win counts
def test_bootstrap_interval_covers_the_true_difference_and_is_seeded():
    import numpy as np

    from medassist.evaluation.stats import paired_difference

    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(40):  # true mean difference 0.03; nominal coverage 95%
        base = rng.uniform(0.4, 0.7, 60)
        model = base + 0.03 + rng.normal(0, 0.08, 60)
        d = paired_difference(model.tolist(), base.tolist(), resamples=1000, seed=trial)
        covered += d.low <= 0.03 <= d.high
    assert covered >= 34, covered
    assert paired_difference(model, base, seed=7) == paired_difference(model, base, seed=7)
    assert paired_difference(model, base, seed=7).low != paired_difference(model, base, seed=8).low


def test_pairing_finds_a_small_consistent_improvement():
    import numpy as np

    from medassist.evaluation.stats import paired_difference

    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, 40)  # questions differ a lot; the model is better on each by ~0.03
    model = base + 0.03 + rng.normal(0, 0.01, 40)
    d = paired_difference(model.tolist(), base.tolist())
    assert d.verdict == "yes" and d.low > 0 and d.wins == 40
    # an unpaired view would not see it: the spread between questions dwarfs the difference
    assert abs(model.mean() - base.mean()) < 2 * base.std() / np.sqrt(40) * np.sqrt(2)


def test_verdicts_and_win_counts():
    from medassist.evaluation.stats import overall_verdict, paired_difference

    base = [0.3 + 0.01 * i for i in range(30)]
    up = paired_difference([b + 0.1 for b in base], base)
    assert up.verdict == "yes" and (up.wins, up.ties, up.losses) == (30, 0, 0)
    assert up.difference == pytest.approx(0.1) and up.low == pytest.approx(0.1) and up.high == pytest.approx(0.1)
    assert paired_difference([b - 0.1 for b in base], base).verdict == "no"
    lower = paired_difference([b - 0.1 for b in base], base, higher_is_better=False)  # perplexity-like
    assert lower.verdict == "yes" and lower.wins == 30
    noisy = paired_difference([b + (0.05 if i % 2 else -0.05) for i, b in enumerate(base)], base)
    assert noisy.verdict == "can't tell" and (noisy.wins, noisy.losses) == (15, 15)
    same = paired_difference(base, base)
    assert same.verdict == "can't tell" and same.ties == 30
    missing = paired_difference([0.5, None, 0.7], [0.4, 0.2, None])
    assert missing.n == 1 and missing.verdict == "can't tell"
    few = paired_difference([b + 0.1 for b in base[:5]], base[:5])  # too few questions for a verdict
    assert few.low == pytest.approx(0.1) and few.verdict == "can't tell"
    assert overall_verdict({"F1": "yes", "factual": "can't tell"})[0] == "yes"
    assert overall_verdict({"F1": "yes", "factual": "no"}) == ("can't tell", "mixed: better on F1, worse on factual")
    assert overall_verdict({"F1": "no", "perplexity": "can't tell"})[0] == "no"


def synthetic_system(name, values: dict[str, list[float]]):
    from medassist.evaluation.results import SystemResult

    n = len(next(iter(values.values())))
    return SystemResult(name=name, label=name, n_examples=n, per_example=values, generated=[f"{name} {i}" for i in range(n)],
                        **{k: sum(v) / n for k, v in values.items() if k != "log_perplexity"})


def test_constant_improvement_gives_yes_and_breakdowns_add_up():
    from medassist.evaluation import assemble

    n = 12
    base = {"bertscore_f1": [0.5 + 0.02 * i for i in range(n)], "factual_consistency": [0.3 + 0.01 * i for i in range(n)],
            "log_perplexity": [2.0 + 0.1 * i for i in range(n)]}
    model = {"bertscore_f1": [v + 0.1 for v in base["bertscore_f1"]],
             "factual_consistency": [v + 0.1 for v in base["factual_consistency"]],
             "log_perplexity": [v - 0.2 for v in base["log_perplexity"]]}
    retrieval = {k: [v + 0.2 for v in vals] for k, vals in base.items() if k != "log_perplexity"}
    qtypes = ["causes", "treatment", "causes", "symptoms"] * 3
    examples = [QAExample(f"Q{i}?", f"A{i}.", i, meta={"qtype": qtypes[i]} | ({"source": "GHR"} if i < 8 else {}))
                for i in range(n)]
    result = assemble(examples, synthetic_system("model", model),
                      {"base_model": synthetic_system("base_model", base),
                       "nearest_training_answer": synthetic_system("nearest_training_answer", retrieval)})
    assert result.verdict("base_model").verdict == "yes"
    assert set(result.verdict("base_model").metrics) == {"BERTScore F1", "factual consistency", "log perplexity"}
    assert result.verdict("nearest_training_answer").verdict == "no"
    assert result.comparison("base_model", "log_perplexity").verdict == "yes"  # lower is better
    for column in ("qtype", "source"):
        assert sum(g.n for g in result.breakdowns[column]) == n
    assert [(g.value, g.n) for g in result.breakdowns["qtype"]] == [("causes", 6), ("symptoms", 3), ("treatment", 3)]
    assert [(g.value, g.n) for g in result.breakdowns["source"]] == [("GHR", 8), ("(none)", 4)]
    causes = result.breakdowns["qtype"][0]
    idx = [i for i in range(n) if qtypes[i] == "causes"]
    assert causes.means["model"]["bertscore_f1"] == pytest.approx(sum(model["bertscore_f1"][i] for i in idx) / len(idx))
    assert causes.vs_base_model["factual_consistency"].difference == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------
# failure measures of answers
def test_repetition_echo_and_length_measures():
    from medassist.evaluation.answers import answer_stats, echoes_question, repetition_rate

    loop = "The condition causes wheezing. " * 3 + "The condition causes coughing. " * 3
    normal = "Asthma is a chronic disease of the airways. Inhalers relieve symptoms and steroids reduce swelling."
    assert repetition_rate(loop) > 0.5 and repetition_rate(normal) == 0.0 and repetition_rate("") == 0.0
    question = "What are the treatments for Bronchitis ?"
    assert echoes_question("What are the treatments for bronchitis? Rest and fluids help most people.", question)
    assert echoes_question("What are the treatments for Bronchitis?", question)
    assert not echoes_question("Bronchitis is treated with rest, fluids and sometimes inhalers.", question)
    assert not echoes_question("", question)
    stats = answer_stats([loop, normal], [normal, normal + " " + normal], [question, "What is asthma?"], [True, False])
    assert stats.cut_at_limit == 0.5 and stats.question_echo_rate == 0.0
    assert stats.repetition_rate == pytest.approx(repetition_rate(loop) / 2)
    assert stats.length_ratio == pytest.approx((len(loop.split()) / 15 + 0.5) / 2)


# ---------------------------------------------------------------------------------------
# the retrieval baseline
def test_nearest_training_answer_is_never_the_asked_questions_own_row():
    from medassist.evaluation import nearest_training_answers

    train = [QAExample("What is asthma?", "own asthma answer", 1),
             QAExample("What are the symptoms of asthma?", "asthma symptoms", 2),
             QAExample("What is gout?", "gout answer", 3, group="gout"),
             QAExample("What causes gout?", "gout causes", 4, group="gout"),
             QAExample("What is flu?", "flu answer", 5)]
    asked = [QAExample("what is  ASTHMA ?", "reference", 99),  # the key of row 1 (case, spaces, punctuation)
             QAExample("What is gout in adults?", "reference", 98, group="gout"),  # the group of rows 3 and 4
             QAExample("What is flu?", "reference", 97)]
    found = nearest_training_answers(train, asked, embed=bag_of_words)
    assert found[0].row != 1 and found[0].answer != "own asthma answer"
    assert found[1].row not in (3, 4) and found[2].row != 5
    # the exclusion is what keeps the own row out: a different key finds it at once
    assert nearest_training_answers(train, [QAExample("What is asthma? Tell me", "r", 0)], embed=bag_of_words)[0].row == 1
    assert nearest_training_answers(train[:1], asked[:1], embed=bag_of_words) == [None]


def test_nearest_training_answer_with_the_minilm_encoder():
    from medassist.config import DataConfig
    from medassist.data import prepare_data
    from medassist.evaluation import nearest_training_answers

    train = prepare_data(DataConfig(), 42).splits["train"]
    asked = train[:12]  # questions the index holds: each must get another row's answer
    found = nearest_training_answers(train, asked)
    assert all(h is not None and h.row != ex.row and question_key(h.question) != question_key(ex.question)
               for h, ex in zip(found, asked))
    assert max(h.similarity for h in found) > 0.6  # related questions are found, not noise


def test_meta_columns_survive_the_split_files(tmp_path):
    from medassist.data import clean_rows, read_table, write_splits

    path = tmp_path / "qa.csv"
    path.write_text("question,answer,qtype,source,url,other\nWhat is gout?,A kind of arthritis.,information,"
                    "NIDDK , https://x.org/gout,y\nWhat is flu?,A viral infection.,,CDC,,\n", encoding="utf-8")
    examples, _ = clean_rows(read_table(path, ["question", "answer"]), "question", "answer")
    assert examples[0].meta == {"qtype": "information", "source": "NIDDK", "url": "https://x.org/gout"}
    assert examples[1].meta == {"source": "CDC"}
    write_splits({"test": examples}, tmp_path / "splits")
    assert read_split(tmp_path / "splits" / "test.jsonl") == examples
    (tmp_path / "old.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A.", "row": 1, "group": None}) + "\n")
    assert read_split(tmp_path / "old.jsonl")[0].meta == {}


# ---------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_report(tmp_path):
    from medassist.cli import main
    from medassist.presets import PRESETS

    if not PRESETS["smollm2-135m"].available():
        pytest.skip("smollm2-135m is not installed")
    out = tmp_path / "out.json"
    assert main(["evaluate", "--model", "smollm2-135m", "--limit", "4", "--max-new-tokens", "16",
                 "--output", str(out), "--report", str(tmp_path / "rep")]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["model"]["bertscore_f1"] <= 1 and result["n_examples"] == 4
    assert math.isfinite(result["model"]["perplexity"]) and result["model"]["perplexity"] > 1
    assert result["verdicts"] and result["comparisons"]
    for name in ("report.html", "f1_distribution.png", "examples.csv", "differences.png"):
        assert (tmp_path / "rep" / name).is_file()


def test_perplexity_alone_is_no_win():
    from medassist.evaluation.stats import overall_verdict

    verdict, reason = overall_verdict({"factual consistency": "can't tell", "BERTScore F1": "can't tell",
                                       "log perplexity": "yes"})
    assert verdict == "can't tell" and "only log perplexity improved" in reason
    assert overall_verdict({"factual consistency": "yes", "BERTScore F1": "can't tell",
                            "log perplexity": "yes"})[0] == "yes"
    assert overall_verdict({"log perplexity": "yes"})[0] == "yes"  # nothing generated to judge


def test_a_checkpoint_is_scored_like_its_run(tmp_path, sample_csv):
    """`evaluate --model RUN/checkpoints/checkpoint-N`: the run's split and prompts, its own file."""
    from medassist.cli import main
    from medassist.models import load_for_inference

    run = tmp_path / "run"
    assert main(["train", "--set", "model=tiny-qwen3", "--set", "max_steps=2", "--set", "save_strategy=steps",
                 "--set", "save_steps=2", "--set", "eval_strategy=no", "--set", "report=false",
                 "--set", "system_prompt=Checkpoint prompt.", "--set", f"data.path={sample_csv}",
                 "--set", "eval.generation_metrics=false", "--output-dir", str(run)]) == 0
    checkpoint = run / "checkpoints" / "checkpoint-2"
    loaded = load_for_inference(str(checkpoint))
    assert loaded.config.system_prompt == "Checkpoint prompt."
    assert "Checkpoint prompt." in loaded.tokenizer.decode(loaded.format().prompt_ids("Flu?"))
    assert main(["evaluate", "--model", str(checkpoint), "--limit", "2", "--no-baselines",
                 "--set", "eval.max_new_tokens=2", "--set", "eval.retrieval_baseline=false",
                 ]) == 0
    result = json.loads((run / "eval_test_checkpoint-2.json").read_text())
    assert result["n_examples"] == 2 and not (run / "eval_test.json").exists()


def test_evaluate_a_run_scores_the_rows_its_training_report_scored(tmp_path):
    """``evaluate RUN`` on the test split takes the same eval.test_limit seeded subset as the
    report written at the end of training, so the two can be paired (``medassist compare``);
    --limit N takes the first N, and a validation split is never cut."""
    import argparse

    from medassist.cli.evaluate import _load_examples
    from medassist.config import TrainConfig
    from medassist.data import write_splits
    from medassist.training.examples import _test_subset

    rows = {s: [QAExample(f"{s} question {i}?", f"answer {i}.", row=i) for i in range(20)]
            for s in ("train", "validation", "test")}
    write_splits(rows, tmp_path / "splits")
    cfg = TrainConfig(eval={"test_limit": 5}, seed=3)
    args = argparse.Namespace(data=None, split="test", limit=None)
    examples, _, info = _load_examples(args, cfg, tmp_path)
    assert examples == _test_subset(rows["test"], cfg) and len(examples) == 5 and info.limit == 5
    assert examples != rows["test"][:5]  # seeded, not the first rows
    examples, _, info = _load_examples(argparse.Namespace(data=None, split="test", limit=7), cfg, tmp_path)
    assert examples == rows["test"][:7] and info.limit == 7
    examples, _, _ = _load_examples(argparse.Namespace(data=None, split="validation", limit=None), cfg, tmp_path)
    assert examples == rows["validation"]


def test_perplexity_under_bf16_autocast_agrees_with_fp32():
    """eval.perplexity_precision bf16: the same examples, the model under bf16 autocast; the
    perplexity within 1e-3 relative of fp32 and the token accuracy within 2 points."""
    from medassist.config import TrainConfig
    from medassist.evaluation.metrics import perplexity_dtype
    from medassist.models import load_for_inference

    loaded = load_for_inference("tiny-qwen3")
    fmt = loaded.family.make_format(loaded.tokenizer, TrainConfig())
    exact = perplexity_and_accuracy(loaded.model, fmt, loaded.family, EXAMPLES, batch_size=2)
    fast = perplexity_and_accuracy(loaded.model, fmt, loaded.family, EXAMPLES, batch_size=2, autocast=torch.bfloat16)
    assert fast["perplexity"] == pytest.approx(exact["perplexity"], rel=1e-3)
    assert fast["perplexity"] != exact["perplexity"]  # bf16 really ran
    assert abs(fast["token_accuracy"] - exact["token_accuracy"]) <= 0.02
    assert perplexity_dtype(EvalConfig(perplexity_precision="fp32")) is None
    assert perplexity_dtype(EvalConfig(perplexity_precision="bf16")) is torch.bfloat16
