"""Grouping and splitting: which rows must share a split, and the seeded train/validation/test split.

Rows whose questions have the same :func:`question_key` (and, optionally, the same group value)
form one group and land in one split, so a test question was never seen in training under
another row. :func:`cross_split_near_duplicates` then reports questions that still look alike
across splits under a stronger normalisation (:func:`compact_key`), for the data manifest.
``medassist.data`` re-exports the public names.
"""

from __future__ import annotations

import random
import re
import unicodedata
from typing import Sequence, TYPE_CHECKING

if TYPE_CHECKING:
    from medassist.data import QAExample

SPLITS = ("train", "validation", "test")

_APOSTROPHES = re.compile(r"['’ʼ`´]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def normalize_question(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def question_key(text: str) -> str:
    """The grouping key: NFKC, case-folded, apostrophes removed, other punctuation read as spaces.

    So "Cri-du-chat syndrome?", "cri du chat syndrome" and "Cri du chat  syndrome ?" share a key,
    as do "47,XYY" / "47, XYY" and "Alzheimer's" / "Alzheimers". Whitespace is collapsed.
    """
    text = _APOSTROPHES.sub("", unicodedata.normalize("NFKC", text).casefold())
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def compact_key(text: str) -> str:
    """A stronger key for near-duplicate reports: :func:`question_key` without any spaces
    ("brain stem" = "brainstem", "branchio-oculo-facial" = "Branchiooculofacial")."""
    return question_key(text).replace(" ", "")


def word_set_key(text: str) -> str:
    """Another near-duplicate key: the sorted distinct words ("Diabetes Type 1" = "type 1 diabetes")."""
    return " ".join(sorted(set(question_key(text).split())))


def group_ids(examples: list[QAExample]) -> list[int]:
    """Connected components over 'same question key' and 'same group value'."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(examples):
        keys = [("q", question_key(ex.question))]
        if ex.group:
            keys.append(("g", ex.group))
        for key in keys:
            j = first_by_key.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(examples))]


def group_split(
    examples: list[QAExample],
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 42,
) -> dict[str, list[QAExample]]:
    """Split whole groups into train/validation/test, seeded and deterministic.

    Groups are shuffled with ``seed`` and handed to test, then validation, until each holds
    its share of rows; the rest is train. With at least three groups and non-zero fractions,
    validation and test each get at least one group.
    """
    ids = group_ids(examples)
    members: dict[int, list[int]] = {}
    for i, gid in enumerate(ids):
        members.setdefault(gid, []).append(i)
    order = sorted(members, key=lambda g: members[g][0])
    random.Random(seed).shuffle(order)
    n = len(examples)
    targets = {"test": test_fraction * n, "validation": validation_fraction * n}
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    cursor = 0
    for split in ("test", "validation"):
        while cursor < len(order) - 1 and len(assigned[split]) < targets[split]:
            size = len(members[order[cursor]])
            overshoot = len(assigned[split]) + size - targets[split]
            if assigned[split] and overshoot > targets[split] - len(assigned[split]):
                break  # closer to the target without this group
            assigned[split].extend(members[order[cursor]])
            cursor += 1
    for gid in order[cursor:]:
        assigned["train"].extend(members[gid])
    return {s: [examples[i] for i in sorted(assigned[s])] for s in SPLITS}


def holdout_split(
    examples: list[QAExample],
    column: str,
    test_values: Sequence[str],
    validation_values: Sequence[str] = (),
) -> tuple[dict[str, list[QAExample]], int]:
    """Split by a column's values: rows whose ``column`` (e.g. ``source``) is in ``test_values``
    form the test split, ``validation_values`` the validation split, the rest train.

    This is the honest test of a tool meant for questions from sources it never saw. Any
    training row in the same group as a held-out row (same normalised question, or same
    ``group_column`` value) is removed from train, so nothing held out was trained on;
    returns the splits and how many training rows were removed that way.
    """
    held = {str(v) for v in test_values} | {str(v) for v in validation_values}
    where = {str(v): "test" for v in test_values} | {str(v): "validation" for v in validation_values}
    ids = group_ids(examples)
    held_groups = {ids[i] for i, ex in enumerate(examples) if str(ex.meta.get(column, "")) in held}
    splits: dict[str, list[QAExample]] = {s: [] for s in SPLITS}
    removed = 0
    for i, ex in enumerate(examples):
        value = str(ex.meta.get(column, ""))
        if value in held:
            splits[where[value]].append(ex)
        elif ids[i] in held_groups:
            removed += 1
        else:
            splits["train"].append(ex)
    return splits, removed


def cross_split_near_duplicates(
    splits: dict[str, list[QAExample]], examples: int = 3
) -> tuple[int, list[list[str]]]:
    """Count pairs of distinct questions in different splits that match on :func:`compact_key`
    or on :func:`word_set_key`.

    Questions are distinct when their :func:`question_key` differs (equal keys never cross
    splits). Returns the count and up to ``examples`` pairs as ``["train: ...", "test: ..."]``.
    """
    seen: dict[str, tuple[str, str]] = {}  # question key -> (split, first question text)
    for split, rows in splits.items():
        for ex in rows:
            seen.setdefault(question_key(ex.question), (split, ex.question))
    rank = {split: i for i, split in enumerate(splits)}
    pairs: dict[tuple[str, ...], None] = {}
    for near_key in (compact_key, word_set_key):
        buckets: dict[str, list[str]] = {}
        for key in seen:
            buckets.setdefault(near_key(key), []).append(key)
        for keys in buckets.values():
            for i, a in enumerate(keys):
                for b in keys[i + 1:]:
                    if seen[a][0] != seen[b][0]:
                        pairs[tuple(sorted((a, b), key=lambda k: (rank[seen[k][0]], k)))] = None
    shown = [[f"{seen[k][0]}: {seen[k][1]}" for k in pair] for pair in list(pairs)[:examples]]
    return len(pairs), shown
