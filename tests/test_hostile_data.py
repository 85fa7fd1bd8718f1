"""Hostile input files (GitHub issue 11): no silent data loss, one clear line for every bad input.

Each test builds its files in tmp_path. The module is used as ``data.<name>`` so that every test
runs (and fails on its own) against an older ``medassist.data`` too.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pandas as pd
import pytest

import medassist.data as data
from medassist.config import DataConfig
from medassist.errors import DataError

ROWS = [("What is asthma?", "A disease of the airways."), ("What is gout?", "A form of arthritis."),
        ("What is anemia?", "Too few red blood cells."), ("What is acne?", "A skin condition.")]


def _csv(tmp_path: Path, lines: list[str], name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _clean(path: Path, columns=("question", "answer")):
    where: dict[str, list[str]] = {}
    frame = data.read_table(path, list(columns))
    rows, dropped = data.clean_rows(frame, columns[0], columns[1], None, where)
    return frame, rows, dropped, where


def _one_line_error(path, needles, columns=("question", "answer")) -> str:
    with pytest.raises(DataError) as info:
        data.read_table(path, list(columns))
    message = str(info.value)
    assert "\n" not in message and Path(path).name in message
    for needle in needles:
        assert needle in message, message
    return message


# 1. wrong number of fields: counted as malformed_row with its line, never shifted ---------
def test_extra_unquoted_comma_is_counted_not_shifted(tmp_path):
    path = _csv(tmp_path, ["question,answer", "What is flu?,A viral infection, usually seasonal"]
                + [f"{q},{a}" for q, a in ROWS])
    frame, rows, dropped, where = _clean(path)
    assert [(r.question, r.answer) for r in rows] == ROWS
    assert [r.row for r in rows] == [2, 3, 4, 5]  # data rows in the file, the bad one counted
    assert dropped["malformed_row"] == 1 and dropped["empty_answer"] == 0
    assert where["malformed_row"] == ["line 2: 3 fields, expected 2"]
    assert data.rows_read(frame) == 5 == len(rows) + sum(dropped.values())


def test_too_few_fields_and_trailing_empty_fields(tmp_path):
    path = _csv(tmp_path, ["question,answer,focus", "What is flu?,A viral infection",
                           '"What is\nacne?","A skin\ncondition.",acne,,', "What is gout?,Arthritis.,gout",
                           "What is x?"])
    _, rows, dropped, where = _clean(path)
    assert [(r.question, r.answer, r.row) for r in rows] == [
        ("What is acne?", "A skin\ncondition.", 2), ("What is gout?", "Arthritis.", 3)]
    assert dropped["malformed_row"] == 2
    assert where["malformed_row"] == ["line 2: 2 fields, expected 3", "line 7: 1 field, expected 3"]


def test_malformed_rows_reach_the_manifest(tmp_path):
    lines = ["question,answer"] + [f"What is condition {i}?,Answer {i}." for i in range(30)]
    lines[5] = "What is flu?,A viral infection, usually seasonal"
    manifest = data.prepare_data(DataConfig(path=str(_csv(tmp_path, lines))), seed=0).manifest
    assert manifest.dropped["malformed_row"] == 1
    assert manifest.dropped_at["malformed_row"] == ["line 6: 3 fields, expected 2"]
    assert manifest.rows_read == 30 == manifest.rows_kept + sum(manifest.dropped.values())


def test_only_malformed_rows_and_unterminated_quote_are_refused(tmp_path):
    _one_line_error(_csv(tmp_path, ["question,answer", "a,b,c", "d,e,f"], "bad.csv"),
                    ["no well-formed rows", "line 2: 3 fields, expected 2"])
    _one_line_error(_csv(tmp_path, ["question,answer", "a,b", '"What is flu?,x', "c,d"], "quote.csv"),
                    ["unterminated quote", "line 3"])


# 2. non-string values: numbers become text, objects/lists/booleans are counted -----------
def test_jsonl_values_of_other_types(tmp_path):
    answers = [42, 3.5, {"text": "x"}, [1, 2], True, None, "  ", "Plain text."]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"Question {i}?", "answer": a})
                              for i, a in enumerate(answers)) + "\n", encoding="utf-8")
    _, rows, dropped, where = _clean(path)
    assert [r.answer for r in rows] == ["42", "3.5", "Plain text."]
    assert dropped["non_text_value"] == 3 and dropped["empty_answer"] == 2
    assert where["non_text_value"] == ["line 3", "line 4", "line 5"]


def test_json_list_keeps_integers_as_written(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"question": "What is 6 x 7?", "answer": 42},
                                {"question": "What is 0 + 1?", "answer": None}]), encoding="utf-8")
    _, rows, dropped, _ = _clean(path)
    assert [r.answer for r in rows] == ["42"] and dropped["empty_answer"] == 1


def test_parquet_integer_column(tmp_path):
    path = tmp_path / "d.parquet"
    pd.DataFrame({"question": ["What is 6 x 7?", "How many lungs?"], "answer": [42, 2],
                  "focus": [7, 7]}).to_parquet(path)
    frame = data.read_table(path, ["question", "answer", "focus"])
    rows, dropped = data.clean_rows(frame, "question", "answer", "focus")
    assert [(r.answer, r.group) for r in rows] == [("42", "7"), ("2", "7")]
    assert dropped["empty_answer"] == 0


def test_missing_group_values_do_not_form_one_group(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"Q{i}?", "answer": "a", "focus": None})
                              for i in range(3)), encoding="utf-8")
    frame = data.read_table(path, ["question", "answer", "focus"])
    rows, _ = data.clean_rows(frame, "question", "answer", "focus")
    assert [r.group for r in rows] == [None, None, None]


# 3. non-UTF-8: the line and byte offset in the file, not in a parser's buffer --------------
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_names_line_and_file_offset(tmp_path, suffix):
    good = ([json.dumps({"question": f"Question {i}?", "answer": "x" * 60}) for i in range(6000)]
            if suffix == ".jsonl" else ["question,answer"] + [f"Question {i}?,{'x' * 60}" for i in range(6000)])
    path = tmp_path / f"latin{suffix}"
    raw = ("\n".join(good) + "\n").encode() + (
        '{"question": "caf\xe9?", "answer": "x"}\n' if suffix == ".jsonl" else "caf\xe9?,x\n").encode("latin-1")
    path.write_bytes(raw)
    offset = raw.index(b"\xe9")
    line = raw.count(b"\n", 0, offset) + 1
    assert offset > 300_000 and line == len(good) + 1  # past the first buffer of pandas' parser
    _one_line_error(path, ["not UTF-8", f"line {line}", f"byte offset {offset}"])


# 4. binary files and control characters ------------------------------------------------
def test_nul_bytes_are_refused_with_their_line(tmp_path):
    path = tmp_path / "nul.csv"
    raw = b"question,answer\nWhat is flu?,A virus.\n\x00\x00\x00,\x00\x00\x00\n"
    path.write_bytes(raw)
    _one_line_error(path, ["binary file", "NUL byte at line 3", f"byte offset {raw.index(0)}"])


def test_control_characters_are_dropped_and_counted(tmp_path):
    path = _csv(tmp_path, ["question,answer", "\x01\x02\x03,\x04\x05", "What is flu?,A virus.\tSeasonal.",
                           "What is gout?,Arth\x1britis"])
    _, rows, dropped, where = _clean(path)
    assert [r.question for r in rows] == ["What is flu?"]
    assert dropped["control_characters"] == 2 and where["control_characters"] == ["line 2", "line 4"]
    escaped = tmp_path / "d.jsonl"  # NUL written as a JSON escape reaches the value itself
    escaped.write_text('{"question": "What?", "answer": "a\\u0000b"}\n', encoding="utf-8")
    assert _clean(escaped)[2]["control_characters"] == 1


# 5. a directory with a data file's name -----------------------------------------------
def test_directory_is_not_called_missing(tmp_path):
    (tmp_path / "x.csv").mkdir()
    message = _one_line_error(tmp_path / "x.csv", ["is a directory"])
    assert "not found" not in message


# 6. bundled data, whatever the working directory ---------------------------------------
def test_bundled_sample_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample = data.resolve_data_path("sample")
    assert sample.is_file() and sample.parent.name == "resources" and sample.parent.parent.name == "medassist"
    assert data.resolve_data_path("data/sample_medical_qa.csv") == sample  # the old default
    manifest = data.prepare_data(DataConfig(path="sample"), seed=42).manifest
    assert manifest.source == str(sample.resolve()) and manifest.rows_kept > 80
    (tmp_path / "sample").write_text("mine")
    assert data.resolve_data_path("sample") == Path("sample")  # an existing file wins
    with pytest.raises(DataError, match="file not found.*bundled data: sample, medquad"):
        data.resolve_data_path("nope.csv")


def test_bundled_medquad_missing_says_what_to_do(monkeypatch):
    monkeypatch.setitem(data.BUNDLED, "medquad", "not-shipped.parquet")
    with pytest.raises(DataError) as info:
        data.prepare_data(DataConfig(path="medquad"), seed=42)
    assert "not installed" in str(info.value) and "import-medquad" in str(info.value)
    assert "\n" not in str(info.value)


def test_resources_ship_in_the_wheel():
    root = Path(data.__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["medassist"]
    package = Path(data.__file__).parent
    for resource in (package / "resources").iterdir():
        assert any(resource.relative_to(package).match(p) for p in patterns), resource


# 6b. punctuation-insensitive groups and the near-duplicate report -----------------------
@pytest.mark.parametrize("a, b", [("cri-du-chat syndrome?", "Cri du chat syndrome"),
                                  ("What is (are) 47, XYY syndrome ?", "What is (are) 47,XYY syndrome?"),
                                  ("Lambert Eaton", "Lambert-Eaton"), ("Alzheimer's disease", "Alzheimers disease")])
def test_question_key_ignores_punctuation(a, b):
    assert data.question_key(a) == data.question_key(b)
    assert data.question_key("type 1 diabetes") != data.question_key("type 11 diabetes")


def test_punctuation_variants_share_a_split(tmp_path):
    lines = ["question,answer,focus"] + [f"What is condition {i}?,Answer {i}.,Condition {i}" for i in range(40)]
    lines += ["What is cri-du-chat syndrome?,One.,Cri-du-chat syndrome",
              "What is Cri du chat syndrome ?,Two.,Cri du chat syndrome",
              "How is it treated?,Three.,CRI DU CHAT SYNDROME"]
    path = _csv(tmp_path, lines)
    for seed in range(8):
        splits = data.prepare_data(DataConfig(path=str(path), group_column="focus"), seed=seed).splits
        homes = {name for name, rows in splits.items() for r in rows if r.answer in ("One.", "Two.", "Three.")}
        assert len(homes) == 1


def test_near_duplicates_across_splits_are_reported(tmp_path):
    splits = {"train": [data.QAExample("What is (are) Branchiooculofacial syndrome ?", "a", 1),
                        data.QAExample("What is (are) Diabetes Type 1 ?", "b", 2)],
              "validation": [data.QAExample("What is (are) branchio-oculo-facial syndrome ?", "c", 3)],
              "test": [data.QAExample("What is (are) type 1 diabetes ?", "d", 4),
                       data.QAExample("What is (are) Diabetes, type 1?", "e", 5)]}
    count, examples = data.cross_split_near_duplicates(splits)
    assert count == 2 and len(examples) == 2
    assert examples[0] == ["train: What is (are) Branchiooculofacial syndrome ?",
                           "validation: What is (are) branchio-oculo-facial syndrome ?"]
    lines = ["question,answer"] + [f"What is condition {i}?,Answer {i}." for i in range(40)]
    manifest = data.prepare_data(DataConfig(path=str(_csv(tmp_path, lines))), seed=0).manifest.to_dict()
    assert manifest["near_duplicates_across_splits"] == 0 and manifest["near_duplicate_examples"] == []


def test_repeated_header_names(tmp_path):
    _one_line_error(_csv(tmp_path, ["question,answer,question", "a,b,c"], "dup.csv"),
                    ["column 'question' appears 2 times"])
    frame = data.read_table(_csv(tmp_path, ["question,answer,url,url", "What?,Yes,a,b"]), ["question", "answer"])
    assert list(frame.columns) == ["question", "answer", "url", "url.1"]
