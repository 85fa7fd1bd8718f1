"""Curation: training answers that teach good habits, and a mix no collection dominates.

Real medical QA files carry habits a small model copies at once (measured on MedQuAD, 15,578
rows; ``docs/recipe.md``):

- **restated questions**: 4,008 answers (nearly all GARD) open by repeating the question
  ("What causes achalasia? The lower esophageal sphincter ..."); a model trained on them
  echoes the question as a header. The opening question sentence is stripped
  (``restated_question_stripped``) when it shares most of its words with the question.
- **boilerplate tables**: 2,243 GARD symptom answers are a Human Phenotype Ontology table
  dump ("Abnormal hair quantity 90% Abnormality of the eyelashes 90% ..."). The table is cut
  off (``boilerplate_cut``); an answer with nothing left before it is dropped
  (``boilerplate_table``).
- **link lists**: 1,085 GHR answers are lists of resource names ("These resources address the
  diagnosis or management of X: - Genetic Testing Registry: ..."); dropped (``link_list``).
- **one collection everywhere**: GHR and GARD are 70% of MedQuAD, and the tuned model applied
  the genetics template to everything. :func:`balance` subsamples the training split so each
  value of a column (``source``) gets a share proportional to ``count ** alpha`` (alpha 1 =
  as found, 0 = equal shares), keeping every row of the smallest group.

Every change is counted; the counts go to the data manifest. Only the training split is
balanced: held-out splits keep their rows as they are (their references are cleaned the same
way, so a metric never rewards copying a table).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from medassist.data import QAExample

_WORD = re.compile(r"[a-z0-9]+")
_LEADING_QUESTION = re.compile(r"^\s*([^.?!\n]{3,300}\?)\s*")
_TABLE_START = re.compile(r"The Human Phenotype Ontology provides the following list", re.I)
_LINK_LIST = re.compile(r"^\s*These resources (address|from)", re.I)
_STOP = frozenset("a an the of in on for to and or is are what who how why when does do can be "
                  "with by about at as it its this that these those i my me".split())
MIN_WORDS_LEFT = 8  # an answer shorter than this after cutting is not worth training on


def _content(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def strip_restated_question(question: str, answer: str, min_overlap: float = 0.6) -> str:
    """``answer`` without an opening question sentence that restates ``question``."""
    match = _LEADING_QUESTION.match(answer)
    if not match:
        return answer
    opening, asked = _content(match.group(1)), _content(question)
    if not opening or len(opening & asked) / len(opening) < min_overlap:
        return answer
    return answer[match.end():]


def cut_boilerplate_table(answer: str) -> str:
    """The answer up to a Human Phenotype Ontology table dump (all of it when there is none)."""
    match = _TABLE_START.search(answer)
    return answer[: match.start()].rstrip() if match else answer


def is_link_list(answer: str) -> bool:
    return bool(_LINK_LIST.match(answer))


def curate(examples: Sequence["QAExample"], strip_question: bool = True, drop_boilerplate: bool = True
           ) -> tuple[list["QAExample"], dict[str, int]]:
    """Cleaned examples and the count of every change, by reason."""
    counts = Counter({"restated_question_stripped": 0, "boilerplate_cut": 0, "boilerplate_table": 0,
                      "link_list": 0})
    kept: list[QAExample] = []
    for ex in examples:
        answer = ex.answer
        if drop_boilerplate and is_link_list(answer):
            counts["link_list"] += 1
            continue
        if strip_question:
            stripped = strip_restated_question(ex.question, answer)
            counts["restated_question_stripped"] += stripped != answer
            answer = stripped
        if drop_boilerplate:
            cut = cut_boilerplate_table(answer)
            if cut != answer:
                if len(cut.split()) < MIN_WORDS_LEFT:
                    counts["boilerplate_table"] += 1
                    continue
                counts["boilerplate_cut"] += 1
                answer = cut
        if len(answer.split()) == 0:
            counts["boilerplate_table"] += 1
            continue
        kept.append(ex if answer == ex.answer else replace(ex, answer=answer.strip()))
    return kept, dict(counts)


def balance(examples: Sequence["QAExample"], column: str, alpha: float, seed: int
            ) -> tuple[list["QAExample"], dict[str, int]]:
    """Subsample so each value of ``column`` has a share proportional to ``count ** alpha``.

    The smallest group keeps all its rows; larger groups are subsampled (seeded). Returns the
    kept examples in their original order and the rows dropped per value.
    """
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(str(ex.meta.get(column, "")), []).append(i)
    if len(groups) < 2 or alpha >= 1.0:
        return list(examples), {}
    weight = {g: len(rows) ** alpha for g, rows in groups.items()}
    # the largest total for which no group needs more rows than it has
    total = min(len(rows) * sum(weight.values()) / weight[g] for g, rows in groups.items())
    rng = random.Random(seed)
    keep: set[int] = set()
    dropped: dict[str, int] = {}
    for g, rows in sorted(groups.items()):
        n = min(len(rows), round(total * weight[g] / sum(weight.values())))
        keep.update(rng.sample(rows, n))
        if len(rows) > n:
            dropped[g] = len(rows) - n
    return [ex for i, ex in enumerate(examples) if i in keep], dropped
