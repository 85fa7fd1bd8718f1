"""The base model's scored answers are reused only when everything they depend on is the same."""

from __future__ import annotations

import json

import pytest
import torch

from medassist.config import EvalConfig, TrainConfig
from medassist.data import QAExample
from medassist.engine import Engine
from medassist.evaluation import base_model_context, evaluate_examples, get_bert_scorer
from medassist.evaluation import evaluate as evaluate_module
from medassist.evaluation.cache import BaselineCache, key_parts, reuse_line
from medassist.evaluation.metrics import factual_scorer_for, perplexity_dtype
from medassist.models import load_pretrained

EXAMPLES = [
    QAExample("What does insulin do?", "Insulin helps glucose move from the blood into cells.", row=1),
    QAExample("What is asthma?", "A long-term disease in which the airways swell and narrow.", row=2),
    QAExample("Is influenza contagious?", "Yes, it spreads through droplets when people cough.", row=3),
]
ECFG = EvalConfig(max_new_tokens=6, retrieval_baseline=False, bootstrap_resamples=200)


@pytest.fixture(scope="module")
def scorer():
    return get_bert_scorer("minilm-l6")


def adapted(seed: int, system_prompt: str | None = None):
    """tiny-qwen3 with a LoRA adapter whose B matrices are random (``seed``): a trained-like adapter."""
    from peft import LoraConfig, get_peft_model

    model, tok, family = load_pretrained("tiny-qwen3")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    cfg = TrainConfig().model_copy(update={"system_prompt": system_prompt}) if system_prompt else None
    return peft_model.eval(), family.make_format(tok, cfg), family


def run(model, fmt, family, scorer, ecfg=ECFG, examples=EXAMPLES):
    return evaluate_examples(Engine(model, fmt, family), examples, ecfg, scorer=scorer,
                             base_model=base_model_context(model, None))


def test_a_second_run_reuses_the_base_answers_even_with_another_adapter(scorer, baseline_cache, monkeypatch):
    calls = []
    score_model = evaluate_module.score_model
    monkeypatch.setattr(evaluate_module, "score_model",
                        lambda *a, **k: calls.append(k.get("name", "model")) or score_model(*a, **k))
    first = run(*adapted(seed=0), scorer)
    assert calls == ["base_model", "model"]
    info = first.settings["baseline_cache"]["base_model"]
    entries = first.settings["baseline_cache"]
    assert sorted(entries) == ["base_model", "repeat_question"]  # no training rows: no nearest-question baseline
    assert info["hit"] is False and info["saved"] is True and sorted(baseline_cache.iterdir()) == sorted(
        baseline_cache / f"{e['key']}.json" for e in entries.values())

    calls.clear()
    second = run(*adapted(seed=1), scorer)  # another adapter, the same base model
    assert calls == ["model"]  # the base model neither generated nor was scored again
    info2 = second.settings["baseline_cache"]["base_model"]
    assert info2["hit"] is True and info2["key"] == info["key"] and info2["created"]
    assert reuse_line(first.settings) is None  # what train and evaluate print, only on a hit
    assert reuse_line(second.settings) == (f"baselines reused from the cache (base_model, repeat_question): "
                                           f"answers and scores from {baseline_cache} (computed {info2['created']})")
    assert second.model.generated != first.model.generated  # the adapter matters to the model's answers
    b1, b2 = first.baselines["base_model"], second.baselines["base_model"]
    assert b2.generated == b1.generated and b2.per_example == b1.per_example
    assert (b2.perplexity, b2.bertscore_f1, b2.answers) == (b1.perplexity, b1.bertscore_f1, b1.answers)
    assert "cache_load_seconds" in b2.timing and info2["computed_timing"] == b1.timing
    # the comparisons with the base model use the stored per-example values
    fresh = run(*adapted(seed=1), scorer, ecfg=ECFG.model_copy(update={"cache_baselines": False}))
    assert "baseline_cache" not in fresh.settings
    assert fresh.baselines["base_model"].per_example == b2.per_example
    same = [(c.metric, c.difference, c.ci_low, c.ci_high) for c in fresh.comparisons if c.baseline == "base_model"]
    assert same == [(c.metric, c.difference, c.ci_low, c.ci_high) for c in second.comparisons
                    if c.baseline == "base_model"]


def parts_for(scorer, model=None, fmt=None, family=None, ecfg=ECFG, examples=EXAMPLES):
    if model is None:
        model, fmt, family = adapted(seed=0)
    ppl = dict(ppl_batch_size=ecfg.perplexity_batch_size, ppl_dtype=perplexity_dtype(ecfg))
    with model.disable_adapter():
        return key_parts(model, Engine(model, fmt, family), examples, ecfg.generation(seed=42), scorer,
                         factual_scorer_for(ecfg), None, ppl)


def perturbed_weight():
    model, fmt, family = adapted(seed=0)
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    return dict(model=model, fmt=fmt, family=family)


CHANGES = {
    "a base weight": perturbed_weight,
    "the system prompt": lambda: dict(zip(("model", "fmt", "family"), adapted(seed=0, system_prompt="Be brief."))),
    "max_new_tokens": lambda: dict(ecfg=ECFG.model_copy(update={"max_new_tokens": 7})),
    "bf16 generation": lambda: dict(ecfg=ECFG.model_copy(update={"dtype": "bf16"})),
    "a reference answer": lambda: dict(examples=[*EXAMPLES[:2], QAExample(EXAMPLES[2].question, "No.", row=3)]),
    "the perplexity precision": lambda: dict(ecfg=ECFG.model_copy(update={  # auto is bf16 on a bf16 CPU
        "perplexity_precision": "fp32" if perplexity_dtype(ECFG) is not None else "bf16"})),
    "the thread count": "threads",
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_that_could_alter_the_base_results_is_a_miss(scorer, change):
    reference = BaselineCache(parts_for(scorer)).key
    assert BaselineCache(parts_for(scorer)).key == reference  # deterministic: the same inputs, the same key
    if CHANGES[change] == "threads":
        threads = torch.get_num_threads()
        torch.set_num_threads(threads + 1)
        try:
            changed = BaselineCache(parts_for(scorer)).key
        finally:
            torch.set_num_threads(threads)
    else:
        changed = BaselineCache(parts_for(scorer, **CHANGES[change]())).key
    assert changed != reference


def test_a_torn_entry_is_recomputed_and_replaced(scorer, baseline_cache):
    model, fmt, family = adapted(seed=0)
    first = run(model, fmt, family, scorer)
    path = baseline_cache / f"{first.settings['baseline_cache']['base_model']['key']}.json"
    path.write_text('{"created": "2026-12-07", "result": {"name": ', encoding="utf-8")
    again = run(*adapted(seed=0), scorer)
    assert again.settings["baseline_cache"]["base_model"]["hit"] is False
    assert again.baselines["base_model"].generated == first.baselines["base_model"].generated
    assert json.loads(path.read_text(encoding="utf-8"))["result"]["generated"] == first.baselines[
        "base_model"].generated
    assert run(*adapted(seed=0), scorer).settings["baseline_cache"]["base_model"]["hit"] is True


def test_cache_off_writes_nothing(scorer, baseline_cache):
    result = run(*adapted(seed=0), scorer, ecfg=ECFG.model_copy(update={"cache_baselines": False}))
    assert "base_model" in result.baselines and list(baseline_cache.iterdir()) == []


def test_the_report_says_when_the_base_results_came_from_the_cache(scorer, tmp_path):
    from medassist.evaluation.report import write_report

    pages = {}
    for name in ("computed", "cached"):
        result = run(*adapted(seed=0), scorer)
        pages[name] = write_report(result, tmp_path / name, None, "t").read_text(encoding="utf-8")
    assert "come from medassist's cache" not in pages["computed"]
    assert "come from medassist's cache" in pages["cached"]
    assert "the base model (computed " in pages["cached"] and "</code>) come from medassist's cache" in pages["cached"]


def test_what_training_leaves_behind_does_not_change_the_key(scorer, monkeypatch):
    """Found on a real run: the report after training missed the entry ``medassist evaluate``
    wrote, because training sets ``use_cache: false`` and inductor puts setuptools' vendored
    packages on ``sys.path`` (so more distributions showed). Neither changes an answer."""
    from medassist.evaluation import cache

    reference = BaselineCache(parts_for(scorer)).key
    model, fmt, family = adapted(seed=0)
    model.config.use_cache = False
    import setuptools
    from pathlib import Path

    vendored = Path(setuptools.__file__).parent / "_vendor"
    if vendored.is_dir():
        monkeypatch.syspath_prepend(str(vendored))
    cache.environment.cache_clear()
    try:
        assert BaselineCache(parts_for(scorer, model=model, fmt=fmt, family=family)).key == reference
    finally:
        cache.environment.cache_clear()


def test_weights_it_cannot_hash_turn_the_cache_off_not_the_evaluation(scorer, baseline_cache):
    """Weights offloaded to the meta device (accelerate's big-model loading) have no values to
    hash: the evaluation goes on without the cache instead of failing."""
    model, fmt, family = adapted(seed=0)
    model.base_model.model.register_buffer("offloaded", torch.empty(2, device="meta"))
    result = run(model, fmt, family, scorer)
    assert result.baselines["base_model"].generated and "base_model" not in result.settings["baseline_cache"]
    assert [p.name for p in baseline_cache.iterdir()] == [  # the other baselines still cached
        f"{result.settings['baseline_cache']['repeat_question']['key']}.json"]


TRAIN = [
    QAExample("What does insulin do in the body?", "It lowers blood sugar.", row=10),
    QAExample("What are the symptoms of asthma?", "Wheezing and shortness of breath.", row=11),
    QAExample("How does the flu spread?", "Through droplets from coughs and sneezes.", row=12),
]


def test_the_text_baselines_are_reused_and_a_changed_training_row_is_a_miss(scorer, baseline_cache, monkeypatch):
    """The nearest-training-question and repeated-question baselines answer without a model: a
    second run with another adapter reuses them (no embedding, no scoring), identically."""
    calls = []
    for name in ("nearest_training_answers", "score_texts"):
        real = getattr(evaluate_module, name)
        monkeypatch.setattr(evaluate_module, name,
                            lambda *a, _n=name, _f=real, **k: calls.append((_n, a[0] if _n == "score_texts" else ""))
                            or _f(*a, **k))
    ecfg = ECFG.model_copy(update={"retrieval_baseline": True})

    def go(seed, train=TRAIN):
        model, fmt, family = adapted(seed=seed)
        return evaluate_examples(Engine(model, fmt, family), EXAMPLES, ecfg, scorer=scorer, train_examples=train,
                                 base_model=base_model_context(model, None))

    first = go(0)
    assert ("nearest_training_answers", "") in calls and ("score_texts", "repeat_question") in calls
    assert sorted(first.settings["baseline_cache"]) == ["base_model", "nearest_training_answer", "repeat_question"]
    calls.clear()
    second = go(1)
    assert calls == [("score_texts", "model")]  # only the tuned model was scored again
    for name in ("nearest_training_answer", "repeat_question"):
        a, b = first.baselines[name], second.baselines[name]
        assert b.generated == a.generated and b.per_example == a.per_example and b.answers == a.answers
        assert second.settings["baseline_cache"][name]["hit"] is True
    assert second.baselines["nearest_training_answer"].answer_source_rows == [10, 11, 12]
    assert [r.baselines["nearest_training_answer"].text for r in second.examples] == [
        r.baselines["nearest_training_answer"].text for r in first.examples]

    calls.clear()
    edited = [*TRAIN[:2], QAExample(TRAIN[2].question, "Flu spreads through the air.", row=12)]
    third = go(1, edited)  # one training answer changed: the nearest-question baseline is computed again
    assert ("nearest_training_answers", "") in calls and ("score_texts", "repeat_question") not in calls
    assert third.settings["baseline_cache"]["nearest_training_answer"]["hit"] is False
    assert third.baselines["nearest_training_answer"].generated[2] == "Flu spreads through the air."


def test_a_custom_question_encoder_is_never_cached(scorer, baseline_cache):
    """An ``embed`` function has no name to key it by: that baseline is computed every time."""
    model, fmt, family = adapted(seed=0)
    ecfg = ECFG.model_copy(update={"retrieval_baseline": True})

    def embed(texts):
        import numpy as np

        vectors = np.array([[len(t), t.count("a") + 1.0] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    for _ in range(2):
        result = evaluate_examples(Engine(model, fmt, family), EXAMPLES, ecfg, scorer=scorer, train_examples=TRAIN,
                                   embed=embed)
        assert "nearest_training_answer" in result.baselines
        assert "nearest_training_answer" not in result.settings["baseline_cache"]


def test_the_former_setting_name_still_turns_the_cache_off():
    assert EvalConfig.model_validate({"cache_base_model": False}).cache_baselines is False
    assert EvalConfig.model_validate({}).cache_baselines is True


def test_the_folder_keeps_the_most_recently_used_entries(scorer, baseline_cache, monkeypatch):
    """The cache does not grow without bound: writing an entry deletes all but the MAX_ENTRIES most
    recently *used* ones, and a hit counts as a use."""
    import os

    from medassist.evaluation import cache

    first = run(*adapted(seed=0), scorer)
    used = sorted(baseline_cache / f"{info['key']}.json" for info in first.settings["baseline_cache"].values())
    stale = []
    for i in range(3):  # entries of other runs, written after these
        path = baseline_cache / f"other{i}.json"
        path.write_text("{}", encoding="utf-8")
        os.utime(path, ns=((100 + i) * 10**9,) * 2)
        stale.append(path)
    for path in used:
        os.utime(path, ns=(10**9, 10**9))  # written long before the others ...
    monkeypatch.setattr(cache, "MAX_ENTRIES", 4)
    again = run(*adapted(seed=1), scorer)  # ... and used again now: all hits
    assert all(info["hit"] for info in again.settings["baseline_cache"].values())
    entry = BaselineCache({"another": "key"})
    entry.save(again.baselines["repeat_question"])
    assert entry.info["pruned"] == 2
    assert sorted(baseline_cache.iterdir()) == sorted([*used, stale[2], entry.path])
    assert cache.prune(baseline_cache, keep=0) == 4 and list(baseline_cache.iterdir()) == []
