import json

import pandas as pd
import pytest

from medassist.config import DataConfig
from medassist.data import (
    QAExample, clean_rows, group_split, normalize_answer, prepare_data, question_key, read_split,
    read_table, resolve_data_path, write_splits,
)
from medassist.errors import DataError


@pytest.fixture
def sample_csv():
    """The bundled sample, wherever the package is installed."""
    return resolve_data_path("sample")


def _examples(n_groups=40, per_group=3):
    return [
        QAExample(question=f"What is condition {g}?" + (" " * r), answer=f"answer {g}.{r}", row=g * per_group + r)
        for g in range(n_groups) for r in range(per_group)
    ]


def test_cleaning_counts_every_drop():
    frame = pd.DataFrame({
        "question": ["What is A?", "What is A?", "  what is   a?  ", "", "What is B?", "What is C?"],
        "answer": ["Alpha.", "Alpha.", "Alpha.", "x", "   ", "Gamma\n\n\n\nmore"],
    })
    rows, dropped = clean_rows(frame, "question", "answer")
    assert dropped == {"malformed_row": 0, "non_text_value": 0, "control_characters": 0,
                       "empty_question": 1, "empty_answer": 1, "duplicate_pair": 2}
    assert [r.question for r in rows] == ["What is A?", "What is C?"]
    assert rows[1].answer == "Gamma\n\nmore"
    assert [r.row for r in rows] == [1, 6]


def test_normalisation():
    assert normalize_answer("  a \t b \r\n\r\n\r\n c  ") == "a b\n\nc"
    assert question_key("  What  IS Asthma ?? ") == question_key("what is asthma")


def test_group_split_never_shares_a_question():
    examples = _examples()
    splits = group_split(examples, 0.1, 0.1, seed=3)
    keys = {name: {question_key(e.question) for e in rows} for name, rows in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert sum(len(v) for v in splits.values()) == len(examples)
    assert len(splits["test"]) == pytest.approx(12, abs=3) and len(splits["validation"]) == pytest.approx(12, abs=3)


def test_group_split_is_seeded():
    examples = _examples()
    a, b = group_split(examples, 0.1, 0.1, seed=7), group_split(examples, 0.1, 0.1, seed=7)
    c = group_split(examples, 0.1, 0.1, seed=8)
    assert a == b
    assert a["test"] != c["test"]


def test_group_column_makes_stricter_split():
    examples = [
        QAExample(question=f"Question {i}?", answer=f"a{i}", row=i, group=f"disease {i % 5}") for i in range(50)
    ]
    splits = group_split(examples, 0.2, 0.2, seed=0)
    groups = {name: {e.group for e in rows} for name, rows in splits.items()}
    assert not groups["train"] & groups["test"] and not groups["train"] & groups["validation"]


def test_prepare_sample_data_manifest(sample_csv):
    prepared = prepare_data(DataConfig(path=str(sample_csv)), seed=42)
    m = prepared.manifest
    assert m.rows_read == len(pd.read_csv(sample_csv))
    assert m.dropped["duplicate_pair"] >= 1 and m.dropped["empty_answer"] >= 1
    assert m.rows_kept + sum(m.dropped.values()) == m.rows_read
    assert sum(m.rows_per_split.values()) == m.rows_kept
    assert all(m.rows_per_split[s] > 0 for s in ("train", "validation", "test"))
    assert len(m.sha256) == 64


def test_splits_round_trip(tmp_path, sample_csv):
    prepared = prepare_data(DataConfig(path=str(sample_csv)), seed=1)
    write_splits(prepared.splits, tmp_path)
    assert read_split(tmp_path / "test.jsonl") == prepared.splits["test"]
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"question", "answer", "row", "group", "meta"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_formats(tmp_path, suffix):
    frame = pd.DataFrame({"q": ["What is A?", "What is B?"], "a": ["Alpha", "Beta"]})
    path = tmp_path / f"d{suffix}"
    frame.to_json(path, orient="records", lines=True) if suffix == ".jsonl" else frame.to_parquet(path)
    rows, _ = clean_rows(read_table(path, ["q", "a"]), "q", "a")
    assert [r.answer for r in rows] == ["Alpha", "Beta"]


def test_bad_files_give_one_line(tmp_path):
    cases = {}
    (tmp_path / "empty.csv").write_text("")
    cases["empty.csv"] = "empty"
    (tmp_path / "nocol.csv").write_text("q,answer\nx,y\n")
    cases["nocol.csv"] = "missing column 'question'"
    (tmp_path / "latin.csv").write_bytes("question,answer\ncaf\xe9,x\n".encode("latin-1"))
    cases["latin.csv"] = "not UTF-8"
    (tmp_path / "data.xlsx").write_text("x")
    cases["data.xlsx"] = "unknown file extension"
    (tmp_path / "header.csv").write_text("question,answer\n")
    cases["header.csv"] = "no data rows"
    for name, needle in cases.items():
        with pytest.raises(DataError) as info:
            read_table(tmp_path / name, ["question", "answer"])
        message = str(info.value)
        assert name in message and needle in message and "\n" not in message
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "absent.csv", ["question"])


@pytest.mark.integration
def test_medquad_split_has_no_leak():
    from conftest import MEDQUAD

    if not MEDQUAD.exists():
        pytest.skip(f"{MEDQUAD} is absent")
    prepared = prepare_data(DataConfig(path=str(MEDQUAD), group_column=None), seed=42)
    m = prepared.manifest
    assert m.rows_read == 15578 and m.rows_kept + sum(m.dropped.values()) == m.rows_read
    keys = {s: {question_key(e.question) for e in rows} for s, rows in prepared.splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert 0.04 < m.rows_per_split["test"] / m.rows_kept < 0.06
    # punctuation variants that used to land in two splits (issue 11): one split each now
    home = {e.question: s for s, rows in prepared.splits.items() for e in rows}
    for a, b in [("What is (are) 47,XYY syndrome ?", "What is (are) 47, XYY syndrome ?"),
                 ("What is (are) cri-du-chat syndrome ?", "What is (are) Cri du chat syndrome ?"),
                 ("What are the treatments for Lambert-Eaton Myasthenic Syndrome ?",
                  "What are the treatments for Lambert Eaton myasthenic syndrome ?")]:
        assert home[a] == home[b]
    assert m.near_duplicates_across_splits <= 2
    strict = prepare_data(DataConfig(path=str(MEDQUAD), group_column="focus"), seed=42).splits
    foci = {s: {e.group for e in rows} for s, rows in strict.items()}
    assert not foci["train"] & foci["test"]
