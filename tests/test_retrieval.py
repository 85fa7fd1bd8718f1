"""Retrieval: chunking limits, group exclusion, the "no source" threshold, entity-aware ranking,
idempotent builds, clear errors, and the `medassist index` commands through a local parser.

A ~20-row corpus written here; the real MiniLM encoder (small) embeds it once per module.
"""

from __future__ import annotations

import argparse
import csv
import sys

import numpy as np
import pytest

from medassist.errors import DataError, MedassistError

pytest.importorskip("bm25s")
from medassist.presets import PRESETS  # noqa: E402

if not PRESETS["minilm-l6"].available():
    pytest.skip("the embedded MiniLM encoder is not installed", allow_module_level=True)

from medassist.data import question_key  # noqa: E402
from medassist.retrieval import (  # noqa: E402
    THRESHOLDS, VARIANTS, Chunker, Retriever, SourceRow, build_index, build_passages, evaluate_retrieval,
    nearest_answers,
)

LONG = " ".join(
    f"Sentence {i} explains one more fact about bronchiectasis, the widening of the airways that traps mucus "
    f"and invites infection number {i}." for i in range(1, 25)
)

ROWS = [
    # (question, answer, focus, qtype, url)
    ("What is (are) Asthma ?", "Asthma is a chronic disease of the airways that makes breathing hard. The airways "
     "swell and narrow, and wheezing, coughing and chest tightness follow.", "Asthma", "information", "u/asthma"),
    ("What are the symptoms of Asthma ?", "Wheezing, coughing, shortness of breath and chest tightness are the "
     "common symptoms of asthma; they often worsen at night.", "Asthma", "symptoms", "u/asthma"),
    ("What are the treatments for Asthma ?", "Asthma is treated with inhaled corticosteroids for long-term control "
     "and quick-relief inhalers such as albuterol during attacks.", "Asthma", "treatment", "u/asthma"),
    ("What is (are) Bronchiectasis ?", LONG, "Bronchiectasis", "information", "u/bronchiectasis"),
    ("What are the treatments for Bronchiectasis ?", "Airway clearance, antibiotics for flare-ups and "
     "bronchodilators are used to treat bronchiectasis.", "Bronchiectasis", "treatment", "u/bronchiectasis"),
    ("What is (are) Acute respiratory distress syndrome ?", "Acute respiratory distress syndrome (ARDS) is a "
     "life-threatening lung condition in which fluid fills the air sacs and oxygen cannot reach the blood.",
     "Acute respiratory distress syndrome", "information", "u/ards"),
    ("What are the treatments for Acute respiratory distress syndrome ?", "People with ARDS are treated in an "
     "intensive care unit with oxygen and mechanical ventilation while the cause is treated.",
     "Acute respiratory distress syndrome", "treatment", "u/ards"),
    ("What is (are) Eales disease ?", "Eales disease is an eye disorder in which the blood vessels of the retina "
     "become inflamed and blocked, causing bleeding into the eye.", "Eales disease", "information", "u/eales"),
    ("What are the treatments for Eales disease ?", "Eales disease may be treated with corticosteroids, laser "
     "photocoagulation of the retina, or vitrectomy surgery.", "Eales disease", "treatment", "u/eales"),
    ("What is (are) Glaucoma ?", "Glaucoma is a group of eye diseases that damage the optic nerve, often "
     "because of high pressure inside the eye.", "Glaucoma", "information", "u/glaucoma"),
    ("What are the treatments for Glaucoma ?", "Eye drops, laser trabeculoplasty and surgery lower the pressure "
     "in the eye to slow glaucoma.", "Glaucoma", "treatment", "u/glaucoma"),
    ("What is (are) Migraine ?", "Migraine is a headache disorder with recurring attacks of throbbing head pain, "
     "often with nausea and sensitivity to light.", "Migraine", "information", "u/migraine"),
    ("What are the treatments for Migraine ?", "Migraine attacks are treated with pain relievers and triptans; "
     "preventive drugs reduce how often they occur.", "Migraine", "treatment", "u/migraine"),
    ("What is (are) Psoriasis ?", "Psoriasis is a skin disease that causes red, itchy, scaly patches, most "
     "often on the knees, elbows, trunk and scalp.", "Psoriasis", "information", "u/psoriasis"),
    ("What are the treatments for Psoriasis ?", "Creams, light therapy and medicines that calm the immune "
     "system are used to treat psoriasis.", "Psoriasis", "treatment", "u/psoriasis"),
    ("What is (are) Type 2 diabetes ?", "Type 2 diabetes is a disease in which blood sugar is too high because "
     "the body does not use insulin well.", "Type 2 diabetes", "information", "u/diabetes"),
    ("What are the symptoms of Type 2 diabetes ?", "Increased thirst, frequent urination, hunger, fatigue and "
     "blurred vision are symptoms of type 2 diabetes.", "Type 2 diabetes", "symptoms", "u/diabetes"),
    ("Is Cystic fibrosis inherited ?", "Cystic fibrosis is inherited in an autosomal recessive pattern: both "
     "copies of the CFTR gene carry mutations.", "Cystic fibrosis", "inheritance", "u/cf"),
    ("What are the symptoms of Cystic fibrosis ?", "Thick sticky mucus clogs the lungs and pancreas, causing "
     "lung infections, poor growth and salty skin.", "Cystic fibrosis", "symptoms", "u/cf"),
    ("What is (are) Gout ?", "Gout is a form of arthritis caused by uric acid crystals in a joint, often the "
     "big toe, with sudden severe pain and swelling.", "Gout", "information", "u/gout"),
    # Adversarial pair (from MedQuAD): the treatments of schizencephaly mention what a question
    # about treating microcephaly asks; only the microcephaly *definition* is indexed.
    ("What is (are) Microcephaly ?", "Microcephaly is a medical condition in which the circumference of the head "
     "is smaller than normal because the brain has not developed properly or has stopped growing.",
     "Microcephaly", "information", "u/microcephaly"),
    ("What are the treatments for Schizencephaly ?", "How might schizencephaly be treated? The best treatment "
     "options depend on the severity of the condition. People with developmental delay or partial paralysis "
     "may be referred for physical therapy and/or occupational therapy. Medications are often prescribed to "
     "prevent seizures. Some affected people have an abnormally small head (microcephaly).",
     "Schizencephaly", "treatment", "u/schizencephaly"),
]


def write_csv(path, rows=ROWS, columns=("question", "answer", "focus", "qtype", "url", "source")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for q, a, f, t, u in rows:
            record = {"question": q, "answer": a, "focus": f, "qtype": t, "url": u, "source": "test"}
            writer.writerow([record[c] for c in columns])
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("corpus") / "qa.csv")


@pytest.fixture(scope="module")
def index_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    result = build_index(corpus, out, chunk_words=30, max_tokens=64)
    assert not result.skipped
    return out


@pytest.fixture(scope="module")
def retriever(index_dir):
    return Retriever.load(index_dir)


def test_chunks_fit_the_encoder_and_keep_url_and_title(retriever):
    tokenizer = retriever.encoder.tokenizer
    rows = [SourceRow(row=1, question="What is (are) Bronchiectasis ?", answer=LONG, focus="Bronchiectasis",
                      url="u/b", source="s"),
            SourceRow(row=2, question="A question used as the title when there is no focus ?",
                      answer="word " * 300 + "end.", url="u/w")]  # one 300-word "sentence"
    passages = build_passages(rows, Chunker(tokenizer, max_tokens=64, chunk_words=50, overlap=1))
    assert len(passages) > 6
    for p in passages:
        assert len(tokenizer(p.embed_text())["input_ids"]) <= 64  # incl. [CLS]/[SEP] and the title
        assert len(p.text.split()) <= 50
        assert p.url == ("u/b" if p.row == 1 else "u/w")
    assert {p.title for p in passages if p.row == 1} == {"Bronchiectasis"}
    assert {p.title for p in passages if p.row == 2} == {rows[1].question}  # no focus: the question
    b = [p for p in passages if p.row == 1]
    assert b[1].text.split(". ")[0] in b[0].text  # one sentence of overlap
    for i in (1, 12, 24):  # every sentence is in some chunk
        assert any(f"Sentence {i} " in p.text for p in b)
    assert passages[0].group == question_key(rows[0].question)


@pytest.mark.parametrize("variant", VARIANTS)
def test_excluded_groups_never_come_back(retriever, variant):
    question = "What are the treatments for Asthma ?"
    everything = retriever.search(question, k=len(retriever), variant=variant, dedupe_urls=False)
    assert any(h.group == question_key(question) for h in everything)
    for excluded in (question, "what are the treatments for asthma"):  # raw text or normalised key
        hits = retriever.search(question, k=len(retriever), exclude_groups=[excluded], variant=variant,
                                dedupe_urls=False)
        assert hits and all(h.group != question_key(question) for h in hits)
        assert all(h.text != ROWS[2][1] for h in hits)


def test_hits_are_deduplicated_by_url(retriever):
    hits = retriever.search("Tell me about bronchiectasis", k=10)
    assert len({h.url for h in hits}) == len(hits)


def test_threshold_returns_nothing_for_an_off_topic_query(retriever):
    t = THRESHOLDS["entity"]
    assert retriever.search("How do I change the oil in a diesel car engine?", k=3, min_score=t) == []
    assert retriever.search("What are the symptoms of Sjogren syndrome ?", k=3, min_score=t) == []  # not indexed
    hits = retriever.search("What are the treatments for Glaucoma ?", k=3, min_score=t)
    assert hits and hits[0].title == "Glaucoma"


def test_entity_variant_finds_the_disease_where_dense_does_not(retriever):
    # Dense question->passage matches "treatments ... microcephaly" in the schizencephaly passage.
    question = "What are the treatments for Microcephaly ?"
    dense = retriever.search(question, k=1, variant="dense")[0]
    entity = retriever.search(question, k=1, variant="entity")[0]
    assert dense.title == "Schizencephaly"
    assert entity.title == "Microcephaly"


def test_nearest_answers_is_the_retrieval_baseline(retriever):
    questions = ["What are the treatments for Asthma ?", "How do I change the oil in a diesel car engine?"]
    hits = nearest_answers(retriever, questions, [[q] for q in questions], min_score=THRESHOLDS["entity"])
    assert hits[0] is not None and hits[0].title == "Asthma" and hits[0].group != question_key(questions[0])
    assert hits[1] is None
    long = nearest_answers(retriever, ["What are the treatments for Bronchiectasis ?"],
                           [["What are the treatments for Bronchiectasis ?"]])[0]
    assert long.text.count("Sentence 24 ") == 1 and long.text.count("Sentence 1 ") == 1  # whole answer, once


def test_evaluation_excludes_each_querys_own_row(retriever, corpus):
    from medassist.retrieval import read_rows

    rows, _ = read_rows(corpus)
    report = evaluate_retrieval(retriever, rows, k_values=(1, 3), variants=["dense", "entity"],
                                styles=["original"], bootstrap=50)
    assert report["queries"]["total"] == len(rows)
    # Every focus with one row (gout) has nothing else to find: its own row is never counted.
    gout = [r for r in rows if r.focus == "Gout"][0]
    hits = retriever.search(gout.question, k=len(retriever), exclude_groups=[gout.question], dedupe_urls=False)
    assert all(h.focus != "Gout" for h in hits)
    m = report["variants"]["entity"]["original"]["focus"]
    assert m["n"] == len(rows) and 0 <= m["recall@1"] <= m["recall@3"] <= 1


def test_build_is_idempotent(corpus, index_dir, tmp_path):
    again = build_index(corpus, index_dir, chunk_words=30, max_tokens=64)
    assert again.skipped
    other = build_index(corpus, tmp_path / "copy", chunk_words=30, max_tokens=64)
    assert not other.skipped and other.manifest["key"] == again.manifest["key"]
    for name in ("passage_vectors.npy", "title_vectors.npy", "question_vectors.npy"):
        assert np.array_equal(np.load(index_dir / name), np.load(tmp_path / "copy" / name))
    assert (index_dir / "passages.parquet").read_bytes() == (tmp_path / "copy" / "passages.parquet").read_bytes()
    changed = build_index(corpus, tmp_path / "copy", chunk_words=20, max_tokens=64, bm25=False)
    assert not changed.skipped and changed.manifest["key"] != again.manifest["key"]


def test_bad_index_dirs_and_inputs_are_one_line_errors(tmp_path, corpus):
    with pytest.raises(MedassistError, match="not found"):
        Retriever.load(tmp_path / "nope")
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "x.txt").write_text("x")
    with pytest.raises(MedassistError, match="not a retrieval index"):
        Retriever.load(tmp_path / "notindex")
    with pytest.raises(DataError, match="refusing to overwrite"):
        build_index(corpus, tmp_path / "notindex")
    no_answer = tmp_path / "bad.csv"
    no_answer.write_text("question,text\nWhat?,x\n")
    with pytest.raises(DataError, match="missing column 'answer'"):
        build_index(no_answer, tmp_path / "i2")


def _cli(argv):
    """What medassist.cli.main does with our commands: MedassistError -> 'error: ...', exit 2."""
    from medassist.cli.index import add_commands

    parser = argparse.ArgumentParser(prog="medassist")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedassistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def test_cli_build_eval_search(tmp_path, corpus, index_dir, capsys):
    assert _cli(["index", "build", str(corpus), "--out", str(index_dir), "--chunk-words", "30",
                 "--max-tokens", "64", "--quiet"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert _cli(["index", "eval", str(index_dir), "--data", str(corpus), "--k", "1,3", "--quiet",
                 "--variants", "dense,bm25,entity", "--styles", "original"]) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "R@3" in out and "entity" in out and f"queries: {len(ROWS)}" in out
    assert _cli(["index", "search", str(index_dir), "What are the treatments for Glaucoma ?"]) == 0
    assert "Glaucoma" in capsys.readouterr().out
    assert _cli(["index", "eval", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert _cli(["index", "build", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert _cli(["index", "eval", str(index_dir), "--data", str(corpus), "--k", "x"]) == 2


def test_cli_build_takes_a_bundled_data_name(tmp_path, capsys, monkeypatch):
    """`medassist index build sample --out DIR` (or `medquad`), from any working directory."""
    monkeypatch.chdir(tmp_path)
    assert _cli(["index", "build", "sample", "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and "sample_medical_qa.csv" in (tmp_path / "idx" / "manifest.json").read_text()
