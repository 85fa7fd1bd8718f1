"""Failure measures of answers as text: length, loops, question echoes, cuts.

A metric mean can stay flat while the answers go wrong in ways a reader sees at once (issue 12):
a tuned model that loops ("The condition causes wheezing. The condition causes coughing. ..."),
opens by restating the question ("What are the treatments for Bronchitis?"), stops mid-sentence
at the token limit, or answers in a tenth of the reference's length. Each is measured per answer
here, for the model and every baseline alike, so the report can set them side by side.
"""

from __future__ import annotations

import re
import statistics
from difflib import SequenceMatcher
from typing import Sequence

from pydantic import BaseModel

_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
ECHO_THRESHOLD = 0.8


def words(text: str) -> list[str]:
    """Lower-cased words (letters/digits, inner hyphens and apostrophes kept)."""
    return _WORD.findall(text.lower())


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that repeat an earlier n-gram of the same answer.

    0 for an answer without repeats (or shorter than ``n`` words); a loop that says the same
    sentence k times approaches ``1 - 1/k``. Trigrams: long enough that ordinary function-word
    pairs ("of the") do not count, short enough to catch a repeated clause.
    """
    tokens = words(text)
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def echoes_question(answer: str, question: str, threshold: float = ECHO_THRESHOLD) -> bool:
    """True when the answer opens by restating the question.

    The question's words are compared with the answer's first as many words (plus two, for
    "Q: ..." style prefixes); an echo is a match ratio (difflib, in order) of ``threshold`` or
    more. "What are the treatments for bronchitis? Rest ..." echoes; "Bronchitis is treated
    with rest" does not.
    """
    q, a = words(question), words(answer)
    if not q or not a:
        return False
    head = a[: len(q) + 2]
    matcher = SequenceMatcher(a=q, b=head, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(q) >= threshold


class AnswerStats(BaseModel):
    """Means over a system's answers (None where the measure does not apply to it).

    ``length_ratio``: median of answer words / reference words. ``cut_at_limit``: share of
    answers that ran into ``max_new_tokens`` (generating systems only). ``repetition_rate``:
    mean of :func:`repetition_rate`. ``question_echo_rate``: share that :func:`echoes_question`.
    """

    n: int = 0
    mean_answer_words: float | None = None
    mean_reference_words: float | None = None
    length_ratio: float | None = None
    empty_answers: float | None = None
    cut_at_limit: float | None = None
    repetition_rate: float | None = None
    question_echo_rate: float | None = None


def answer_stats(answers: Sequence[str], references: Sequence[str], questions: Sequence[str],
                 hit_limit: Sequence[bool] | None = None) -> AnswerStats:
    if not answers:
        return AnswerStats()
    n_words = [len(words(a)) for a in answers]
    ref_words = [len(words(r)) for r in references]
    ratios = [a / r for a, r in zip(n_words, ref_words) if r]
    return AnswerStats(
        n=len(answers),
        mean_answer_words=statistics.fmean(n_words),
        mean_reference_words=statistics.fmean(ref_words),
        length_ratio=statistics.median(ratios) if ratios else None,
        empty_answers=sum(not a.strip() for a in answers) / len(answers),
        cut_at_limit=sum(map(bool, hit_limit)) / len(hit_limit) if hit_limit else None,
        repetition_rate=statistics.fmean(repetition_rate(a) for a in answers),
        question_echo_rate=sum(echoes_question(a, q) for a, q in zip(answers, questions)) / len(answers),
    )
