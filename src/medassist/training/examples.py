"""Step 3 of the recipe, data -> tensors: each question/answer pair through the family's
formatter into input ids and answer-only labels (:func:`tokenize_examples`), and the seeded
subsets evaluated during and after training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medassist.config import TrainConfig
from medassist.data import QAExample
from medassist.families import ModelFamily
from medassist.formatting import Passage, PromptFormat


@dataclass
class TokenizedSplit:
    features: list[dict[str, Any]]
    dropped_no_answer_tokens: int = 0
    truncated: int = 0
    passages_given: list[int] = field(default_factory=list)  # with retrieval: per example, retrieved
    passages_kept: list[int] = field(default_factory=list)  # ... and left in the prompt by the length budget

    @property
    def supervised_tokens(self) -> int:
        return sum(f["n_supervised"] for f in self.features)

    def passages_line(self) -> str:
        n = max(1, len(self.passages_kept))
        dropped = sum(self.passages_given) - sum(self.passages_kept)
        return (f"{sum(self.passages_kept) / n:.2f} per prompt ({dropped} of {sum(self.passages_given)} retrieved "
                "passages dropped to fit max_length * max_prompt_fraction)")


def tokenize_examples(fmt: PromptFormat, family: ModelFamily, examples: list[QAExample],
                      passages: list[list[Passage]] | None = None) -> TokenizedSplit:
    """Input ids and the answer-only labels of each example; ``passages``: the sources each
    prompt carries (retrieval), aligned with ``examples``."""
    out = TokenizedSplit(features=[])
    for i, ex in enumerate(examples):
        sources = passages[i] if passages is not None else ()
        if passages is not None:
            out.passages_given.append(len(sources))
            out.passages_kept.append(len(fmt.fit_passages(ex.question, passages=sources)))
        enc = fmt.encode(ex.question, ex.answer, sources)
        if enc is None:
            out.dropped_no_answer_tokens += 1
            continue
        out.truncated += int(enc.truncated)
        out.features.append({
            "input_ids": enc.input_ids, "labels": enc.labels,
            "length": family.sample_length(enc),
            "n_supervised": enc.n_supervised,
        })
    return out


def to_dataset(features: TokenizedSplit | list[dict[str, Any]]):
    from datasets import Dataset

    rows = features.features if isinstance(features, TokenizedSplit) else features
    return Dataset.from_list(rows) if rows else None


def validation_loss_subset(features: list[dict[str, Any]], cfg: TrainConfig) -> list[dict[str, Any]]:
    """The validation rows of the loss at every evaluation: at most ``eval.loss_limit`` (a
    subset seeded by ``seed``, the same every time and after a resume), all when null."""
    from medassist.evaluation.hooks import seeded_subset

    limit = cfg.eval.loss_limit
    return list(features) if limit is None else seeded_subset(features, limit, cfg.seed)


def _test_subset(rows: list[QAExample], cfg: TrainConfig) -> list[QAExample]:
    """At most ``eval.test_limit`` test rows, a seeded subset, so the final report stays bounded."""
    from medassist.evaluation.hooks import seeded_subset

    limit = cfg.eval.test_limit
    return list(rows) if limit is None else seeded_subset(rows, limit, cfg.seed)
