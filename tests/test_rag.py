"""Grounded answers (issue 13 items 2, 3, 5): retrieval-augmented training, evaluation with and
without retrieval, and answers that cite their sources.

A 20-row corpus written here, split by ``source`` as the held-out-collection experiment is:
``A`` trains, ``T`` is the test collection, ``V`` validation. The real MiniLM encoder indexes it
(a few seconds); the models are the random ``tiny-qwen3``.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from medassist.cli import main
from medassist.config import RetrievalConfig, load_config
from medassist.data import QAExample, question_key, read_split
from medassist.formatting import IGNORE_INDEX
from medassist.presets import PRESETS

pytest.importorskip("bm25s")
if not PRESETS["minilm-l6"].available():
    pytest.skip("the embedded MiniLM encoder is not installed", allow_module_level=True)

from medassist.retrieval import Retriever, build_index  # noqa: E402
from medassist.retrieval.augment import (  # noqa: E402
    cached_retrieve, index_rows, retrieve, retrieve_one, run_sources,
)

ASTHMA = ("Asthma is a chronic disease of the airways that makes breathing hard. The airways swell and narrow, "
          "and wheezing, coughing and chest tightness follow.")
ROWS = [  # question, answer, focus, source, url
    ("What is (are) Asthma ?", ASTHMA, "Asthma", "A", "u/asthma"),
    ("Do you have information about Asthma", ASTHMA, "Asthma", "A", "u/asthma-2"),  # same answer, other question
    ("What are the symptoms of Asthma ?", "Wheezing, coughing, shortness of breath and chest tightness are the "
     "common symptoms of asthma; they often worsen at night.", "Asthma", "A", "u/asthma"),
    ("What are the treatments for Asthma ?", "Asthma is treated with inhaled corticosteroids for long-term control "
     "and quick-relief inhalers such as albuterol during attacks.", "Asthma", "T", "u/asthma-t"),
    ("What is (are) Glaucoma ?", "Glaucoma is a group of eye diseases that damage the optic nerve, often because "
     "of high pressure inside the eye.", "Glaucoma", "A", "u/glaucoma"),
    ("What are the treatments for Glaucoma ?", "Eye drops, laser trabeculoplasty and surgery lower the pressure in "
     "the eye to slow glaucoma.", "Glaucoma", "T", "u/glaucoma-t"),
    ("What is (are) Migraine ?", "Migraine is a headache disorder with recurring attacks of throbbing head pain, "
     "often with nausea and sensitivity to light.", "Migraine", "A", "u/migraine"),
    ("What are the treatments for Migraine ?", "Migraine attacks are treated with pain relievers and triptans; "
     "preventive drugs reduce how often they occur.", "Migraine", "V", "u/migraine-v"),
    ("What is (are) Psoriasis ?", "Psoriasis is a skin disease that causes red, itchy, scaly patches, most often on "
     "the knees, elbows, trunk and scalp.", "Psoriasis", "A", "u/psoriasis"),
    ("What are the treatments for Psoriasis ?", "Creams, light therapy and medicines that calm the immune system "
     "are used to treat psoriasis.", "Psoriasis", "A", "u/psoriasis"),
    ("What is (are) Gout ?", "Gout is a form of arthritis caused by uric acid crystals in a joint, often the big "
     "toe, with sudden severe pain and swelling.", "Gout", "A", "u/gout"),
    ("What are the treatments for Gout ?", "Gout attacks are treated with anti-inflammatory drugs, colchicine or "
     "corticosteroids; allopurinol lowers uric acid.", "Gout", "A", "u/gout"),
    ("What is (are) Type 2 diabetes ?", "Type 2 diabetes is a disease in which blood sugar is too high because the "
     "body does not use insulin well.", "Type 2 diabetes", "A", "u/diabetes"),
    ("What are the symptoms of Type 2 diabetes ?", "Increased thirst, frequent urination, hunger, fatigue and "
     "blurred vision are symptoms of type 2 diabetes.", "Type 2 diabetes", "A", "u/diabetes"),
    ("Is Cystic fibrosis inherited ?", "Cystic fibrosis is inherited in an autosomal recessive pattern: both copies "
     "of the CFTR gene carry mutations.", "Cystic fibrosis", "A", "u/cf"),
    ("What are the symptoms of Cystic fibrosis ?", "Thick sticky mucus clogs the lungs and pancreas, causing lung "
     "infections, poor growth and salty skin.", "Cystic fibrosis", "A", "u/cf"),
    ("What is (are) Sjogren syndrome ?", "Sjogren syndrome is an autoimmune disorder in which immune cells attack "
     "the glands that make tears and saliva.", "Sjogren syndrome", "T", "u/sjogren-t"),
    ("What is (are) Shingles ?", "Shingles is a painful rash caused by the varicella zoster virus, the virus that "
     "causes chickenpox.", "Shingles", "A", "u/shingles"),
    ("What are the treatments for Shingles ?", "Antiviral medicines such as acyclovir shorten shingles; pain "
     "medicines ease the pain.", "Shingles", "A", "u/shingles"),
    ("What is (are) Anemia ?", "Anemia is a condition in which the blood has fewer red blood cells or less "
     "hemoglobin than normal.", "Anemia", "A", "u/anemia"),
]
HOLDOUT = ["data.holdout_column=source", "data.test_values=[T]", "data.validation_values=[V]"]
TINY_RUN = ["model=tiny-qwen3", "max_steps=3", "max_length=384", "eval_strategy=no", "save_strategy=no",
            "eval.subset=2", "eval.max_new_tokens=6", "eval.bootstrap_resamples=100", "retrieval.enabled=true",
            "retrieval.k=2", *HOLDOUT]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "focus", "source", "url", "qtype"])
        for q, a, f, s, u in ROWS:
            writer.writerow([q, a, f, s, u, "information"])
    return path


def examples_of(source: str | None = None) -> list[QAExample]:
    return [QAExample(q, a, row=i + 1, meta={"focus": f, "source": s, "url": u})
            for i, (q, a, f, s, u) in enumerate(ROWS) if source is None or s == source]


@pytest.fixture(scope="module")
def train_retriever(tmp_path_factory):
    """The training rows (source A) indexed, as a run without retrieval.index builds it."""
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(index_rows(examples_of("A")), out, max_tokens=64, chunk_words=40)
    return Retriever.load(out)


@pytest.fixture(scope="module")
def full_index(tmp_path_factory, corpus):
    """Every row indexed, held-out collections included: a built corpus a user might pass."""
    out = tmp_path_factory.mktemp("full") / "idx"
    build_index(corpus, out, max_tokens=64, chunk_words=40)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("runs") / "rag"
    code = main(["train", *sum((["--set", s] for s in [*TINY_RUN, f"data.path={corpus}"]), []),
                 "--output-dir", str(run)])
    assert code == 0
    return run


# ---------------------------------------------------------------------------------------
# training prompts
def test_prompt_carries_the_passages_and_the_mask_covers_only_the_answer(qwen_tokenizer, train_retriever):
    from medassist.families import get_family
    from medassist.training import tokenize_examples

    family = get_family("decoder")
    fmt = family.make_format(qwen_tokenizer, load_config(None, {"max_length": 512}))
    example = examples_of("T")[0]  # treatments for asthma: the training split knows asthma
    found = retrieve(train_retriever, [example], RetrievalConfig(k=2))[0]
    assert found.hits and all(h.title == "Asthma" for h in found.hits)
    passages = found.passages()
    enc = fmt.encode(example.question, example.answer, passages)
    prompt = qwen_tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label == IGNORE_INDEX])
    assert "Sources:\n[1] Asthma: " + passages[0].text in prompt and prompt.index("Sources:") < prompt.index(
        "Question: " + example.question)
    trained = [t for t in enc.labels if t != IGNORE_INDEX]
    assert trained == qwen_tokenizer(example.answer).input_ids + [fmt.eos_id]  # answer + EOS, nothing else
    assert enc.labels[: len(enc.labels) - len(trained)] == [IGNORE_INDEX] * (len(enc.labels) - len(trained))

    tokenized = tokenize_examples(fmt, family, [example, example], [passages, []])
    assert tokenized.features[0]["input_ids"] == enc.input_ids
    assert len(tokenized.features[1]["input_ids"]) < len(enc.input_ids)  # no sources, no "Sources:"
    assert tokenized.features[0]["n_supervised"] == tokenized.features[1]["n_supervised"] == len(trained)
    assert tokenized.passages_given == [len(passages), 0] and tokenized.passages_kept == [len(passages), 0]

    tight = family.make_format(qwen_tokenizer, load_config(None, {"max_length": 64}))  # 32 prompt tokens
    assert tight.fit_passages(example.question, passages=passages) == []  # sources dropped before the question


def test_own_group_and_own_answer_are_never_retrieved_for_themselves(train_retriever):
    training = examples_of("A")
    asthma = training[0]  # its answer is also indexed under "Do you have information about Asthma"
    found = retrieve(train_retriever, [asthma], RetrievalConfig(k=3))[0]
    answer = " ".join(asthma.answer.split())
    assert found.hits, "the other asthma rows are still sources"
    for hit in found.hits:
        assert hit.group != question_key(asthma.question)
        assert " ".join(hit.text.split()) not in answer
    leaky = retrieve(train_retriever, [asthma], RetrievalConfig(k=3, exclude_own_group=False))[0]
    assert any(" ".join(h.text.split()) in answer for h in leaky.hits)  # the default is what prevents it


def test_distractor_share_is_respected_and_seeded(train_retriever):
    training = examples_of("A") * 2  # 32 examples
    rcfg = RetrievalConfig(k=2, distractor_share=0.3)
    first = retrieve(train_retriever, training, rcfg, seed=1, distractors=True)
    again = retrieve(train_retriever, training, rcfg, seed=1, distractors=True)
    other = retrieve(train_retriever, training, rcfg, seed=2, distractors=True)
    chosen = [i for i, r in enumerate(first) if r.distractor]
    assert len(chosen) == round(0.3 * len(training)) == 10
    assert first == again and chosen != [i for i, r in enumerate(other) if r.distractor]
    for i in chosen:
        ex, hits = training[i], first[i].hits
        assert len(hits) == 2 and len({h.url for h in hits}) == 2
        assert all(h.focus != ex.meta["focus"] and h.group != question_key(ex.question) for h in hits)
    assert not any(r.distractor for r in retrieve(train_retriever, training, rcfg, seed=1))  # evaluation: never
    assert retrieve_one(train_retriever, training, chosen[0], rcfg, seed=1, distractors=True) == first[chosen[0]]
    assert retrieve_one(train_retriever, training, 0, rcfg, seed=1, distractors=True).hits == first[0].hits


def test_retrieved_passages_are_cached_per_split(tmp_path, train_retriever, monkeypatch):
    rcfg = RetrievalConfig(k=2)
    training = examples_of("A")
    path = tmp_path / "train.jsonl"
    first, cached = cached_retrieve(path, train_retriever, training, rcfg, seed=3, distractors=True)
    assert not cached and path.is_file()
    monkeypatch.setattr(train_retriever, "search_many", lambda *a, **k: pytest.fail("searched again"))
    again, cached = cached_retrieve(path, train_retriever, training, rcfg, seed=3, distractors=True)
    assert cached and again == first
    monkeypatch.undo()
    _, cached = cached_retrieve(path, train_retriever, training, rcfg.model_copy(update={"k": 1}), seed=3)
    assert not cached  # other settings: searched again


# ---------------------------------------------------------------------------------------
# no held-out leakage
def test_no_held_out_reference_is_retrievable_during_its_own_evaluation(tmp_path, corpus, full_index):
    """Whatever the index: the run's own (training split only) or a built corpus that holds
    the held-out collections, a held-out question's own row never reaches its prompt."""
    cfg = load_config(None, [f"data.path={corpus}", *HOLDOUT, "retrieval.enabled=true", "retrieval.k=3"])
    from medassist.data import prepare_data

    splits = prepare_data(cfg.data, cfg.seed).splits
    held = [*splits["validation"], *splits["test"]]
    assert held and {ex.meta["source"] for ex in held} == {"T", "V"}
    for index in (None, str(full_index)):
        run_cfg = cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(update={"index": index})})
        sources = run_sources(run_cfg, tmp_path / f"run-{index is None}", splits)
        retriever = sources.retriever
        for ex in held:
            # no threshold, no exclusion: everything the index would ever return for this question
            everything = retriever.search(ex.question, k=len(retriever), dedupe_urls=False)
            assert everything, "other passages stay retrievable"
            for hit in everything:
                assert hit.source not in ("T", "V") and hit.group != question_key(ex.question)
                assert " ".join(hit.text.split()) not in " ".join(ex.answer.split())
        for split in ("validation", "test"):
            assert not any(r.distractor for r in sources.by_split[split])
    assert sources.retriever.blocked is not None and sources.retriever.blocked.sum() == 4  # T and V rows


SJOGREN_SYMPTOMS = ("What are the symptoms of Sjogren syndrome ?", "Dry eyes and a dry mouth are the main "
                    "symptoms of Sjogren syndrome; joint pain and tiredness are common.", "Sjogren syndrome", "T",
                    "u/sjogren-t")  # a second row of the held-out page: citable only with heldout_corpus=open


@pytest.fixture(scope="module")
def open_corpus_index(tmp_path_factory):
    """The full corpus plus a sibling row on the held-out Sjogren page, indexed."""
    folder = tmp_path_factory.mktemp("open")
    with open(folder / "qa.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer", "focus", "source", "url", "qtype"])
        for q, a, f, s, u in [*ROWS, SJOGREN_SYMPTOMS]:
            writer.writerow([q, a, f, s, u, "information"])
    build_index(folder / "qa.csv", folder / "idx", max_tokens=64, chunk_words=40)
    return folder / "qa.csv", folder / "idx"


def test_open_heldout_corpus_cites_other_rows_of_an_unseen_collection_but_training_never_sees_them(
        tmp_path, open_corpus_index):
    data, index = open_corpus_index
    base = [f"data.path={data}", *HOLDOUT, "retrieval.enabled=true", "retrieval.k=3", f"retrieval.index={index}",
            "retrieval.min_score=0.0", "retrieval.distractor_share=0.5"]
    from medassist.data import prepare_data

    found = {}
    for mode in ("blocked", "open"):
        cfg = load_config(None, [*base, f"retrieval.heldout_corpus={mode}"])
        splits = prepare_data(cfg.data, cfg.seed).splits
        sources = run_sources(cfg, tmp_path / mode, splits)
        for r in sources.by_split["train"]:  # relevant and distractor passages alike
            assert all(h.source not in ("T", "V") for h in r.hits)
        for split in ("validation", "test"):
            for ex, r in zip(splits[split], sources.by_split[split]):
                assert all(h.group != question_key(ex.question) for h in r.hits)
                assert all(" ".join(h.text.split()) not in " ".join(ex.answer.split()) for h in r.hits)
                found[mode, ex.question] = {(h.source, h.url) for h in r.hits}
    what_is, symptoms = "What is (are) Sjogren syndrome ?", SJOGREN_SYMPTOMS[0]
    assert all(source not in ("T", "V") for (mode, _), hits in found.items() if mode == "blocked"
               for source, _ in hits)
    assert ("T", "u/sjogren-t") in found["open", what_is]  # the other row of its page
    assert ("T", "u/sjogren-t") in found["open", symptoms]
    assert sources.info()["heldout_corpus"] == "open" and sources.info()["blocked_passages"] == 0


def test_evaluate_cli_with_an_open_heldout_corpus_cites_the_unseen_page(run_dir, tmp_path, open_corpus_index):
    _, index = open_corpus_index
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(run_dir), "--no-baselines", "--output", str(out), "--index", str(index),
                 "--set", "retrieval.heldout_corpus=open", "--set", "eval.max_new_tokens=4",
                 "--set", "eval.bootstrap_resamples=100", "--set", "eval.retrieval_baseline=false"])
    assert code == 0
    result = json.loads(out.read_text())
    r = result["retrieval"]
    assert r["heldout_corpus"] == "open" and r["own_reference_hits"] == 0 and r["blocked_passages"] == 0
    assert r["reference_overlap"] == pytest.approx(0.0)  # the sibling row restates nothing of the reference
    by_question = {e["question"]: e["sources"] for e in result["examples"]}
    assert "u/sjogren-t" in {s["url"] for s in by_question["What is (are) Sjogren syndrome ?"]}


def test_reference_overlap_counts_the_reference_8_grams_a_passage_restates():
    from medassist.evaluation.grounding import reference_overlap
    from medassist.retrieval.search import Hit

    example = QAExample("q", "One two three four five six seven eight nine ten", row=1)  # three 8-grams
    def hit(text):
        return Hit(text, "t", "u", 1.0, "g", 2, 0)
    assert reference_overlap(example, [hit("one two three four five six seven eight and more")]) == pytest.approx(1 / 3)
    assert reference_overlap(example, [hit("x " + example.answer)]) == pytest.approx(1.0)
    assert reference_overlap(example, [hit("two three four five six seven eight")]) == 0.0
    assert reference_overlap(example, []) == 0.0


# ---------------------------------------------------------------------------------------
# a run trained with retrieval, and its evaluation
def test_run_trains_with_sources_and_evaluates_with_and_without_them(run_dir):
    for name in ("retrieval/index/manifest.json", "retrieval/train.jsonl", "retrieval/validation.jsonl",
                 "retrieval/test.jsonl", "eval_test.json", "report/report.html"):
        assert (run_dir / name).is_file(), name
    index_rows_ = Retriever.load(run_dir / "retrieval" / "index").passages
    train_keys = {question_key(ex.question) for ex in read_split(run_dir / "splits" / "train.jsonl")}
    assert set(index_rows_["group"]) <= train_keys  # built from the training split only
    summary = json.loads((run_dir / "train_summary.json").read_text())["retrieval"]
    assert summary["train"]["examples"] == 16 and summary["train"]["distractor_only"] == 3  # 0.2 of 16

    result = json.loads((run_dir / "eval_test.json").read_text())
    assert {"no_retrieval", "base_model"} <= set(result["baselines"])
    verdicts = {v["baseline"]: v["label"] for v in result["verdicts"]}
    assert verdicts["no_retrieval"] == "the same model without retrieval"
    assert verdicts["base_model"] == "the base model with retrieval"
    r = result["retrieval"]
    assert r["own_reference_hits"] == 0 and r["n_examples"] == 3 and r["k"] == 2
    assert 0 <= r["recall_at_k"] <= 1 and set(r["source_support"]) == {"model", "no_retrieval", "base_model"}
    by_question = {e["question"]: e["sources"] for e in result["examples"]}
    assert {s["title"] for s in by_question["What are the treatments for Asthma ?"]} == {"Asthma"}
    assert by_question["What is (are) Sjogren syndrome ?"] == []  # nothing about it was trained on: no source
    assert any(c["baseline"] == "no_retrieval" and c["metric"] == "source_support" for c in result["comparisons"])


def test_evaluate_cli_rescores_a_retrieval_run_and_compare_pairs_two_runs(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["evaluate", "--model", str(run_dir), "--no-baselines", "--output", str(out), "--report",
                 str(tmp_path / "report"), "--set", "eval.max_new_tokens=6", "--set", "eval.bootstrap_resamples=100",
                 "--set", "eval.retrieval_baseline=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "better than the same model without retrieval" in text and "recall@2" in text
    result = json.loads(out.read_text())
    assert set(result["baselines"]) == {"no_retrieval", "repeat_question"}
    assert result["retrieval"]["own_reference_hits"] == 0 and result["retrieval"]["n_examples"] == 3
    assert (run_dir / "retrieval" / "eval_test.jsonl").is_file()
    assert "Retrieval: sources in the prompt" in (tmp_path / "report" / "report.html").read_text()

    # the run without retrieval, stood in for by the same evaluation with BERTScore F1 lower by 0.25
    other = json.loads(out.read_text())
    for row in other["examples"]:
        row["generated"] = "Asthma."
        row["scores"] = {**row["scores"], "bertscore_f1": row["scores"]["bertscore_f1"] - 0.25}
    (tmp_path / "other.json").write_text(json.dumps(other))
    code = main(["compare", str(out), str(tmp_path / "other.json"), "--output", str(tmp_path / "cmp.json")])
    assert code == 0
    compared = json.loads((tmp_path / "cmp.json").read_text())
    assert set(compared["baselines"]) == {"no_retrieval", "repeat_question", "other_run"}
    diff = {c["metric"]: c for c in compared["comparisons"] if c["baseline"] == "other_run"}
    assert diff["bertscore_f1"]["difference"] == pytest.approx(0.25) and diff["bertscore_f1"]["wins"] == 3
    assert diff["factual_consistency"]["difference"] == pytest.approx(0.0)
    assert diff["bertscore_f1"]["n"] == 3 and compared["retrieval"] == result["retrieval"]
    assert main(["compare", str(out), str(tmp_path / "missing.json")]) == 2


# ---------------------------------------------------------------------------------------
# the chat page shows the sources as links
SSE_WITH_SOURCES = "".join(f"data: {json.dumps(event)}\n\n" for event in [
    {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Inhaled corticosteroids."},
                  "finish_reason": None}]},
    {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
     "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
     "sources": [{"index": 1, "title": "Asthma", "url": "https://medlineplus.gov/asthma.html", "score": 0.9},
                 {"index": 2, "title": "<img src=x onerror=alert(1)>", "url": "javascript:alert(1)", "score": 0.85}]},
]) + "data: [DONE]\n\n"


def test_chat_page_lists_the_sources_as_safe_links(live_server):
    from pathlib import Path

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (make browser)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from medassist.config import ServeConfig
    from medassist.models import load_for_inference
    from medassist.serving import create_app

    app = create_app(load_for_inference("tiny-qwen3"), ServeConfig(model_name="tiny-qwen3"))
    with live_server(app) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox",
                                                                           "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append("dialog " + d.message), d.dismiss()))
            page.route("**/v1/chat/completions", lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body=SSE_WITH_SOURCES))
            page.goto(url + "/")
            page.fill("#input", "How is asthma treated?")
            page.keyboard.press("Enter")
            sources = page.locator(".msg.assistant .sources")
            sync_api.expect(sources).to_be_visible(timeout=15_000)
            sync_api.expect(sources.locator("li")).to_have_count(2)
            link = sources.locator("a")
            sync_api.expect(link).to_have_count(1)  # the javascript: URL is no link
            assert link.get_attribute("href") == "https://medlineplus.gov/asthma.html"
            assert link.get_attribute("rel") == "noopener noreferrer" and link.inner_text() == "Asthma"
            sync_api.expect(sources.locator("li").nth(1)).to_have_text("<img src=x onerror=alert(1)>")  # as text
            assert sources.locator("img").count() == 0 and not errors, errors

            no_source = SSE_WITH_SOURCES.replace('"sources": [', '"sources_note": "No source found.", "sources": [] ,'
                                                 ' "unused": [')
            page.unroute("**/v1/chat/completions")
            page.route("**/v1/chat/completions", lambda route: route.fulfill(
                status=200, headers={"Content-Type": "text/event-stream"}, body=no_source))
            page.fill("#input", "How do I fix my car?")
            page.keyboard.press("Enter")
            sync_api.expect(page.locator(".msg.assistant .sources").nth(1)).to_have_text("No source found.")
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------
# answers that cite
def test_only_sources_the_answer_used_are_listed():
    from medassist.formatting import Passage
    from medassist.serving.sources import NO_SOURCE, UNUSED, SourceFinder

    asthma = Passage("Asthma is treated with inhaled corticosteroids for long-term control and quick-relief "
                     "inhalers such as albuterol during attacks.", "Asthma", "https://x/asthma", 0.9)
    gout = Passage("Gout attacks are treated with colchicine; allopurinol lowers uric acid.", "Gout", "u/gout", 0.81)
    question = "How is asthma treated?"
    used = SourceFinder.cited("Doctors use inhaled corticosteroids and albuterol inhalers.", question, [gout, asthma])
    assert [(s.id, s.title, s.url) for s in used.sources] == [(2, "Asthma", "https://x/asthma")] and used.note is None
    assert used.lines() == ["Sources:", "[2] Asthma - https://x/asthma"]
    echo = SourceFinder.cited("Asthma is treated.", question, [asthma])  # only the question's words: no use
    assert echo.sources == () and echo.note == UNUSED
    assert SourceFinder.cited("Rest.", question, []).note == NO_SOURCE
    assert SourceFinder.cited("", question, [asthma]).sources == ()


def test_generate_and_chat_answer_from_the_runs_index_and_say_when_nothing_is_found(run_dir, capsys):
    from io import StringIO

    from medassist.cli.serve import cmd_chat
    from medassist.serving.sources import NO_SOURCE, UNUSED

    assert main(["generate", "--model", str(run_dir), "--max-new-tokens", "4", "How do I change my car's oil?"]) == 0
    out, err = capsys.readouterr()
    assert out.rstrip().endswith(NO_SOURCE) and "retrieval/index" in err
    assert main(["generate", "--model", str(run_dir), "--max-new-tokens", "4", "--no-index",
                 "How is gout treated?"]) == 0
    assert "source" not in capsys.readouterr().out.lower()

    from medassist.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(run_dir), "--max-new-tokens", "4"])
    questions = iter(["What are the treatments for Gout ?", "How do I change my car's oil?"])
    out = StringIO()

    def ask(_prompt: str) -> str:
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    assert cmd_chat(args, input_fn=ask, out=out) == 0
    text = out.getvalue()
    assert UNUSED in text or "Sources:\n[1] Gout" in text  # the gout page is found; a random model uses it or not
    assert text.count(NO_SOURCE) == 1


def test_api_returns_the_sources_and_the_openai_client_reads_them(run_dir, live_server, monkeypatch):
    import httpx
    import openai

    from medassist.config import ServeConfig
    from medassist.models import load_for_inference
    from medassist.serving import create_app
    from medassist.serving.sources import NO_SOURCE, Grounding, Source, SourceFinder, sources_for

    loaded = load_for_inference(str(run_dir))
    finder = sources_for(loaded)
    assert finder is not None and finder.k == 2  # the run's own index and k
    # a random model cannot use a source: here every passage in the prompt counts as used
    # (the rule itself is tested above), so the wire format carries some
    monkeypatch.setattr(SourceFinder, "cited", staticmethod(lambda answer, question, passages: Grounding(
        tuple(Source(i, p.title, p.url, p.score) for i, p in enumerate(passages, 1))) if passages
        else Grounding(note=NO_SOURCE)))
    settings = ServeConfig(model_name="rag", default_max_tokens=4, temperature=0.0)
    asked = [{"role": "user", "content": "What are the treatments for Gout ?"}]
    with live_server(create_app(loaded, settings, sources=finder)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="rag", messages=asked, max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert [s["title"] for s in reply.sources] == ["Gout"] and reply.sources[0]["url"] == "u/gout"
        assert reply.model_extra["sources"][0]["index"] == 1 and 0.8 <= reply.sources[0]["score"] <= 1.0

        chunks = list(client.chat.completions.create(model="rag", messages=asked, max_tokens=4, stream=True,
                                                     stream_options={"include_usage": True}))
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens >= 0  # usage and sources in the last chunk
        assert [s["title"] for s in last.sources] == ["Gout"]
        assert not any(getattr(c, "sources", None) for c in chunks[:-1])
        plain = list(client.chat.completions.create(model="rag", messages=asked, max_tokens=4, stream=True))
        assert plain[-1].choices == [] and plain[-1].usage is None and plain[-1].sources[0]["title"] == "Gout"

        none = client.chat.completions.create(
            model="rag", messages=[{"role": "user", "content": "How do I change my car's oil?"}], max_tokens=4)
        assert none.sources == [] and none.sources_note == NO_SOURCE

    with live_server(create_app(loaded, settings)) as base:  # no index: the response is OpenAI's, unchanged
        raw = httpx.post(base + "/v1/chat/completions", json={"messages": asked, "max_tokens": 4}, timeout=60).json()
        assert "sources" not in raw and "sources_note" not in raw
