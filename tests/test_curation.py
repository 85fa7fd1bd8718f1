"""Curation and the held-out-collection split: bad habits are removed and counted, no
collection dominates, and nothing of a held-out collection reaches training."""

from __future__ import annotations

import pandas as pd
import pytest

from medassist.config import load_config
from medassist.curation import balance, curate, cut_boilerplate_table, is_link_list, strip_restated_question
from medassist.data import QAExample, prepare_data, question_key
from medassist.errors import ConfigError, DataError


def test_restated_question_is_stripped_only_when_it_restates():
    q = "What causes achalasia ?"
    assert strip_restated_question(q, "What causes achalasia? The sphincter does not relax.") == \
        "The sphincter does not relax."
    # a different question at the start is content, not an echo
    kept = "Is it painful? Usually not, but swallowing is hard."
    assert strip_restated_question(q, kept) == kept
    assert strip_restated_question(q, "No question here. Fine.") == "No question here. Fine."


def test_boilerplate_tables_are_cut_and_link_lists_recognised():
    answer = ("Some people have seizures. The Human Phenotype Ontology provides the following list of "
              "signs and symptoms for X. Abnormal hair quantity 90% Microdontia 50%")
    assert cut_boilerplate_table(answer) == "Some people have seizures."
    assert is_link_list("These resources address the diagnosis or management of X: - Genetic Testing Registry")
    assert not is_link_list("Resources are limited in rural areas.")


def test_curate_counts_every_change():
    rows = [
        QAExample("What causes achalasia?", "What causes achalasia? The lower sphincter fails to relax in people "
                  "with this rare disorder of the esophagus.", 1),
        QAExample("What are the symptoms of X?", "The Human Phenotype Ontology provides the following list "
                  "of signs and symptoms for X. Seizures 90%", 2),
        QAExample("How to diagnose X?", "These resources address the diagnosis or management of X: - GTR", 3),
        QAExample("What is Y?", "Y is a condition of the blood that makes people tired and pale.", 4),
    ]
    kept, counts = curate(rows)
    assert [ex.row for ex in kept] == [1, 4]
    assert kept[0].answer.startswith("The lower sphincter")
    assert counts == {"restated_question_stripped": 1, "boilerplate_cut": 0, "boilerplate_table": 1, "link_list": 1}
    assert rows[0].answer.startswith("What causes")  # the input is not mutated


def test_balance_gives_shares_proportional_to_count_power_alpha():
    rows = [QAExample(f"q{i}", "a", i, meta={"source": "big" if i < 900 else "small"}) for i in range(1000)]
    kept, dropped = balance(rows, "source", 0.5, seed=1)
    small = sum(ex.meta["source"] == "small" for ex in kept)
    big = len(kept) - small
    assert small == 100  # the smallest group keeps every row
    assert big == pytest.approx(100 * (900 / 100) ** 0.5, abs=1)  # sqrt(900)/sqrt(100) = 3x
    assert dropped == {"big": 900 - big}
    assert balance(rows, "source", 0.5, seed=1)[0] == kept  # seeded
    assert balance(rows, "source", 1.0, seed=1)[0] == rows  # alpha 1: as found


@pytest.fixture
def collections_csv(tmp_path):
    rows = []
    for source, n in (("A", 30), ("B", 10), ("C", 8), ("D", 6)):
        rows += [{"question": f"What is {source} disease {i}?", "answer": f"{source} disease {i} is a condition.",
                  "source": source, "focus": f"{source}{i}"} for i in range(n)]
    rows.append({"question": "What is C disease 0?", "answer": "Asked again in collection A.", "source": "A",
                 "focus": "C0"})
    path = tmp_path / "qa.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_holdout_split_keeps_held_out_collections_out_of_training(collections_csv):
    cfg = load_config(None, {"data": {"path": str(collections_csv), "holdout_column": "source",
                                      "test_values": ["C"], "validation_values": ["D"]}})
    data = prepare_data(cfg.data, seed=0)
    splits = data.splits
    assert {ex.meta["source"] for ex in splits["test"]} == {"C"} and len(splits["test"]) == 8
    assert {ex.meta["source"] for ex in splits["validation"]} == {"D"}
    assert {ex.meta["source"] for ex in splits["train"]} == {"A", "B"}
    held = {question_key(ex.question) for s in ("test", "validation") for ex in splits[s]}
    assert not held & {question_key(ex.question) for ex in splits["train"]}
    assert data.manifest.dropped["same_group_as_held_out"] == 1  # the repeated question left train


def test_holdout_typos_and_missing_values_are_one_line_errors(collections_csv):
    cfg = load_config(None, {"data": {"path": str(collections_csv), "holdout_column": "source",
                                      "test_values": ["Cc"]}})
    with pytest.raises(DataError, match="has no value 'Cc'"):
        prepare_data(cfg.data, seed=0)
    with pytest.raises(ConfigError, match="holdout_column needs test_values"):
        load_config(None, {"data": {"holdout_column": "source"}})


def test_balanced_training_split_is_counted(collections_csv):
    cfg = load_config(None, {"data": {"path": str(collections_csv), "holdout_column": "source",
                                      "test_values": ["D"], "balance_column": "source", "balance_alpha": 0.0}})
    data = prepare_data(cfg.data, seed=0)
    counts = pd.Series([ex.meta["source"] for ex in data.splits["train"]]).value_counts()
    assert counts.nunique() == 1  # alpha 0: equal shares
    assert data.manifest.dropped["balanced_out"] == 31 + 10 + 8 - 3 * counts.iloc[0]
