"""Tests for the MedQuAD XML importer and the bundled sample CSV."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from medassist.data import resolve_data_path
from medassist.errors import DataError
from medassist.medquad import COLUMNS, ImportStats, import_medquad, write_csv

SAMPLE_CSV = resolve_data_path("sample")

CANCER_1 = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="0000001_1" source="CancerGov" url="https://example.org/1">
<Focus>Adult   Acute
Lymphoblastic Leukemia</Focus>
<FocusAnnotations><UMLS><CUIs><CUI>C0000</CUI></CUIs></UMLS></FocusAnnotations>
<QAPairs>
<QAPair pid="1">
<Question qid="0000001_1-1" qtype="information">What is (are)   Adult Acute
  Lymphoblastic Leukemia ?</Question>
<Answer>
  Key Points - Line one.
Line two.
</Answer>
</QAPair>
<QAPair pid="2">
<Question qid="0000001_1-2" qtype="symptoms">What are the symptoms of ALL ?</Question>
</QAPair>
<QAPair pid="3">
<Question qid="0000001_1-3" qtype="treatment">How to treat ALL ?</Question>
<Answer>Chemotherapy &amp; other options.</Answer>
</QAPair>
</QAPairs>
</Document>
"""

# No source attribute: the source falls back to the top-level folder name.
CANCER_2 = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="0000002_1">
<Focus>Melanoma</Focus>
<QAPairs>
<QAPair pid="1">
<Question qid="0000002_1-1" qtype="causes">What causes Melanoma ?</Question>
<Answer>   </Answer>
</QAPair>
<QAPair pid="2">
<Question qid="0000002_1-2" qtype="prevention">How to prevent Melanoma ?</Question>
<Answer>Use sunscreen.</Answer>
</QAPair>
</QAPairs>
</Document>
"""

GARD_1 = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="0000100" source="GARD" url="https://example.org/3">
<Focus>Anemia</Focus>
<QAPairs>
<QAPair pid="1">
<Question qid="0000100-1" qtype="information">What is Anemia ?</Question>
<Answer>Too few red cells.</Answer>
</QAPair>
</QAPairs>
</Document>
"""

BROKEN = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="bad"><Focus>Oops</Focus><QAPairs><QAPair>
"""


@pytest.fixture
def medquad_tree(tmp_path: Path) -> Path:
    root = tmp_path / "MedQuAD"
    cancer = root / "1_CancerGov_QA"
    gard = root / "2_GARD_QA"
    cancer.mkdir(parents=True)
    gard.mkdir()
    # Written out of order on purpose: import must still visit files sorted.
    (gard / "0000100.xml").write_text(GARD_1, encoding="utf-8")
    (cancer / "0000002_1.xml").write_text(CANCER_2, encoding="utf-8")
    (cancer / "0000001_1.xml").write_text(CANCER_1, encoding="utf-8")
    (gard / "0000200.xml").write_text(BROKEN, encoding="utf-8")
    (gard / "readme.txt").write_text("not xml", encoding="utf-8")
    return root


def test_counts(medquad_tree: Path) -> None:
    rows, stats = import_medquad(medquad_tree)
    assert isinstance(stats, ImportStats)
    assert stats.files_read == 4
    assert stats.pairs_seen == 6
    assert stats.pairs_kept == 4
    assert stats.skipped_no_answer == 2
    assert stats.files_unparseable == [medquad_tree / "2_GARD_QA" / "0000200.xml"]
    assert len(rows) == 4


def test_fields_and_whitespace(medquad_tree: Path) -> None:
    rows, _ = import_medquad(medquad_tree)
    first = rows[0]
    assert set(first) == set(COLUMNS)
    assert first == {
        "question": "What is (are) Adult Acute Lymphoblastic Leukemia ?",
        "answer": "Key Points - Line one.\nLine two.",
        "qtype": "information",
        "focus": "Adult Acute Lymphoblastic Leukemia",
        "source": "CancerGov",
        "url": "https://example.org/1",
    }
    assert rows[1]["answer"] == "Chemotherapy & other options."
    assert rows[1]["qtype"] == "treatment"


def test_source_falls_back_to_folder(medquad_tree: Path) -> None:
    rows, _ = import_medquad(medquad_tree)
    melanoma = [r for r in rows if r["focus"] == "Melanoma"]
    assert melanoma == [
        {
            "question": "How to prevent Melanoma ?",
            "answer": "Use sunscreen.",
            "qtype": "prevention",
            "focus": "Melanoma",
            "source": "1_CancerGov_QA",
            "url": "",
        }
    ]


def test_sorted_order(medquad_tree: Path) -> None:
    rows, _ = import_medquad(medquad_tree)
    assert [r["question"] for r in rows] == [
        "What is (are) Adult Acute Lymphoblastic Leukemia ?",
        "How to treat ALL ?",
        "How to prevent Melanoma ?",
        "What is Anemia ?",
    ]
    assert [r["source"] for r in rows] == ["CancerGov", "CancerGov", "1_CancerGov_QA", "GARD"]
    assert [r["url"] for r in rows] == ["https://example.org/1", "https://example.org/1", "", "https://example.org/3"]


def test_missing_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        import_medquad(tmp_path / "nope")


def test_dir_without_xml_raises(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="no MedQuAD XML"):
        import_medquad(tmp_path)


def test_write_csv_round_trip(medquad_tree: Path, tmp_path: Path) -> None:
    rows, _ = import_medquad(medquad_tree)
    out = tmp_path / "out" / "medquad.csv"
    write_csv(rows, out)
    df = pd.read_csv(out, encoding="utf-8", keep_default_na=False)
    assert list(df.columns) == list(COLUMNS)
    assert df.to_dict("records") == rows


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def test_sample_csv_shape_and_repeats() -> None:
    df = pd.read_csv(SAMPLE_CSV, encoding="utf-8", keep_default_na=False)
    assert list(df.columns) == ["question", "answer", "qtype", "focus"]
    assert len(df) >= 80

    assert df.duplicated(subset=["question", "answer"]).any()

    pairs = df.assign(q=df["question"].map(_norm)).drop_duplicates(["q", "answer"])
    answers_per_q = pairs.groupby("q")["answer"].nunique()
    assert (answers_per_q > 1).any()

    assert (df["answer"].str.strip() == "").sum() >= 1
