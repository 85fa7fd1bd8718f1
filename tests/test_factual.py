"""The factual-consistency scorer: facts, contradictions, question copies, the labelled set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medassist.errors import ModelError
from medassist.evaluation.factual import FactualScore, FactualScorer, get_factual_scorer
from medassist.evaluation.factual_facts import extract_facts

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "data" / "eval" / "factual_consistency_labelled.jsonl"
CF_REF = ("This condition is inherited in an autosomal recessive pattern, which means both copies of the gene in "
          "each cell have mutations. The parents each carry one copy of the mutated gene.")
A1AT_REF = ("Mutations in the SERPINA1 gene cause alpha-1 antitrypsin deficiency. The protein protects the lungs "
            "from neutrophil elastase, an enzyme released by white blood cells.")


@pytest.fixture(scope="module")
def scorer() -> FactualScorer:
    return FactualScorer()


def one(scorer, answer, reference, question="") -> FactualScore:
    return scorer.score([answer], [reference], [question])[0]


def keys(text, category):
    return {f.key for f in extract_facts(text) if f.category == category}


def test_gene_symbols_inheritance_and_numbers_are_extracted():
    text = ("Mutations in the CFTR gene and in SERPINA1 cause it; it is autosomal dominant in 1 in 2,500 people "
            "and 5% of cases, and F8 makes factor VIII. The DNA test uses an MRI.")
    assert {"CFTR", "SERPINA1", "F8"} <= keys(text, "gene")
    assert "DNA" not in keys(text, "gene") | keys(text, "symbol")
    assert keys(text, "inheritance") == {"AD"}
    assert {"2500", "5"} <= keys(text, "number") and "1" not in keys(text, "number")
    assert keys("It affects one-third of adults and about half of patients", "number") == {"0.333333", "0.5"}
    assert keys("The kidneys and cardiac muscle", "anatomy") == {"kidney", "heart", "muscle"}


def test_contradicted_inheritance_lowers_the_score(scorer):
    right = one(scorer, "Cystic fibrosis is autosomal recessive; parents are usually carriers.", CF_REF)
    wrong = one(scorer, "Cystic fibrosis is autosomal dominant; parents are usually carriers.", CF_REF)
    assert wrong.contradictions == 1 and right.contradictions == 0
    assert wrong.factual_consistency < 0.5 * right.factual_consistency
    assert any("autosomal dominant" in u for u in wrong.unsupported)


def test_paraphrase_beats_on_topic_invention(scorer):
    para = one(scorer, "It results from changes in SERPINA1, whose protein shields the lungs from neutrophil elastase.",
               A1AT_REF)
    gene = one(scorer, "It results from changes in SERPINB1, whose protein shields the lungs from neutrophil elastase.",
               A1AT_REF)
    organ = one(scorer, "SERPINA1 makes a protein that protects the kidneys from an enzyme of red blood cells.", A1AT_REF)
    assert para.factual_consistency > 0.7
    assert gene.contradictions >= 1 and organ.contradictions >= 1
    assert para.factual_consistency > 2 * max(gene.factual_consistency, organ.factual_consistency)


def test_numbers_and_swapped_bindings(scorer):
    ref = "Fragile X syndrome occurs in approximately 1 in 4,000 males and 1 in 8,000 females."
    good = one(scorer, "About one in 4,000 boys and one in 8,000 girls have it.", ref)
    swapped = one(scorer, "It occurs in about 1 in 8,000 males and 1 in 4,000 females.", ref)
    wrong = one(scorer, "It affects about 1 in 400 males.", ref)
    assert good.contradictions == 0 and swapped.contradictions >= 1 and wrong.contradictions == 1
    assert one(scorer, "About one in five cases are hereditary.", "About 20% of cases are hereditary.").contradictions == 0


def test_facts_copied_from_the_question_are_not_support(scorer):
    question = "What are the genetic changes related to SYNGAP1-related intellectual disability?"
    ref = "It is caused by mutations in the SYNGAP1 gene, whose protein works at synapses between nerve cells."
    answer = "It is caused by mutations in the SYNGAP1 gene."
    with_q, without_q = one(scorer, answer, ref, question), one(scorer, answer, ref)
    assert any("SYNGAP1" in s for s in without_q.supported)
    assert not any("SYNGAP1" in s for s in with_q.supported)
    assert with_q.factual_consistency < without_q.factual_consistency


def test_empty_generic_and_no_fact_answers(scorer):
    empty = one(scorer, "   ", CF_REF)
    assert (empty.factual_consistency, empty.support, empty.coverage, empty.contradictions) == (0.0, 0.0, 0.0, 0)
    generic = one(scorer, "This condition can vary from person to person. Talk to your doctor.", CF_REF)
    assert generic.n_facts == 0 and generic.fact_support is None and generic.factual_consistency < 0.3
    assert scorer.score([], []) == []
    with pytest.raises(ValueError):
        scorer.score(["a"], [])


def test_all_scores_are_bounded(scorer):
    for s in scorer.score(["", "x", CF_REF, "1 in 5 have ABC1 mutations in the liver"], [CF_REF, "", CF_REF, A1AT_REF]):
        assert 0.0 <= s.factual_consistency <= s.support <= 1.0 and 0.0 <= s.coverage <= 1.0
    assert one(scorer, CF_REF, CF_REF).factual_consistency == 1.0


def _auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_labelled_set_schema_and_auc_regression_guard(scorer):
    rows = [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]
    assert len(rows) >= 80
    for r in rows:
        assert {"id", "question", "reference", "answer", "label", "kind", "source"} <= r.keys()
        assert r["label"] in ("supported", "unsupported") and r["source"].startswith("http")
        assert r["answer"].strip() and r["reference"].strip() and r["kind"]
    assert len({r["id"] for r in rows}) == len(rows)
    labels = [r["label"] == "supported" for r in rows]
    assert 0.4 < sum(labels) / len(rows) < 0.6
    assert len({r["source"].split("/")[2] for r in rows}) >= 5  # several NIH collections
    results = scorer.score([r["answer"] for r in rows], [r["reference"] for r in rows], [r["question"] for r in rows])
    assert _auc([r.factual_consistency for r in results], labels) >= 0.85
    held = [i for i, r in enumerate(rows) if r.get("split", "design") != "design"]
    assert _auc([results[i].factual_consistency for i in held], [labels[i] for i in held]) >= 0.8


def test_nli_scorer_missing_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        get_factual_scorer(str(tmp_path / "no-such-nli-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot be loaded"):
        get_factual_scorer(str(tmp_path / "empty"))


def _tiny_classifier(folder: Path, id2label: dict) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir()
    words = "the gene is autosomal dominant recessive it cystic fibrosis parents carriers".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "."]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words) + 6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()})
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_nli_scorer_runs_on_a_tiny_local_classifier(tmp_path):
    folder = _tiny_classifier(tmp_path / "nli", {0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"})
    scorer = get_factual_scorer(str(folder))  # max_length is capped at the model's 64 positions
    results = scorer.score(["It is autosomal dominant. Parents are carriers.", ""], [CF_REF * 5, CF_REF])
    assert len(results) == 2 and results[0].n_facts == 2 and results[1].factual_consistency == 0.0
    assert 0.0 <= results[0].factual_consistency <= results[0].support <= 1.0
    bad = _tiny_classifier(tmp_path / "sentiment", {0: "NEGATIVE", 1: "POSITIVE"})
    with pytest.raises(ModelError, match="entailment"):
        get_factual_scorer(str(bad))
