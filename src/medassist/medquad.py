"""Import the MedQuAD question/answer collection from its XML files.

MedQuAD ships as a directory tree of XML documents, one per topic, for example
``1_CancerGov_QA/0000001_1.xml``. Each document looks like::

    <Document id="0000001_1" source="CancerGov" url="https://www.cancer.gov/...">
      <Focus>Adult Acute Lymphoblastic Leukemia</Focus>
      <QAPairs>
        <QAPair pid="1">
          <Question qid="0000001_1-1" qtype="information">What is ...?</Question>
          <Answer>...</Answer>
        </QAPair>
      </QAPairs>
    </Document>

:func:`import_medquad` flattens the tree into row dicts with the keys in
:data:`COLUMNS`; :func:`write_csv` saves them. Some MedQuAD subsets have their
answers removed for licensing reasons, so pairs with a missing or empty answer
are skipped and counted rather than kept.
"""

from __future__ import annotations

import csv
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from medassist.errors import DataError

COLUMNS = ("question", "answer", "qtype", "focus", "source", "url")

_WS = re.compile(r"\s+")


@dataclass
class ImportStats:
    """What an import saw: files and pairs read, kept and skipped."""

    files_read: int = 0
    pairs_seen: int = 0
    pairs_kept: int = 0
    skipped_no_answer: int = 0
    files_unparseable: list[Path] = field(default_factory=list)


def _text(elem: ET.Element | None) -> str:
    """All text inside ``elem`` (including nested tags), or "" if absent."""
    return "".join(elem.itertext()) if elem is not None else ""


def _collapse(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def import_medquad(root: Path) -> tuple[list[dict], ImportStats]:
    """Read every ``*.xml`` file under ``root`` (recursively, in sorted order).

    Returns one dict per kept pair with keys question, answer, qtype, focus,
    source and url. ``url`` is the Document's ``url`` attribute (the NIH page
    the answer came from; cite it when the answer is shown), "" when absent.
    The question and focus have their whitespace collapsed; the answer is only
    stripped, so its internal line breaks survive. ``source`` is the
    Document's ``source`` attribute, or else the name of the top-level folder
    under ``root`` that holds the file. Files that are not well-formed XML are
    listed in the stats and skipped.

    Raises DataError when ``root`` is not a directory or holds no XML file.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MedQuAD directory not found: {root}")
    files = sorted(p for p in root.rglob("*.xml") if p.is_file())
    if not files:
        raise DataError(f"no MedQuAD XML files (*.xml) found under {root}")

    rows: list[dict] = []
    stats = ImportStats()
    for path in files:
        stats.files_read += 1
        try:
            doc = ET.parse(path).getroot()
        except ET.ParseError:
            stats.files_unparseable.append(path)
            continue
        rel = path.relative_to(root)
        folder = rel.parts[0] if len(rel.parts) > 1 else ""
        source = (doc.get("source") or "").strip() or folder
        focus = _collapse(_text(doc.find("Focus")))
        url = (doc.get("url") or "").strip()
        for pair in doc.iter("QAPair"):
            stats.pairs_seen += 1
            q = pair.find("Question")
            answer = _text(pair.find("Answer")).strip()
            if not answer:
                stats.skipped_no_answer += 1
                continue
            rows.append(
                {
                    "question": _collapse(_text(q)),
                    "answer": answer,
                    "qtype": (q.get("qtype", "") if q is not None else "").strip(),
                    "focus": focus,
                    "source": source,
                    "url": url,
                }
            )
            stats.pairs_kept += 1
    return rows, stats


def write_csv(rows: list[dict], out: Path) -> None:
    """Write ``rows`` to ``out`` as UTF-8 CSV with the columns in :data:`COLUMNS`.

    Parent folders are created as needed; keys outside COLUMNS are ignored.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
