"""Factual consistency with an NLI (MNLI-style) classifier, for users who have one.

The offline scorer (:mod:`medassist.evaluation.factual`) matches facts lexically, so it cannot see a
relation that is reworded or reversed with the same words ("F9 causes hemophilia A"). A
cross-encoder trained on natural-language inference reads the pair and judges entailment.
No such model ships in a PyPI package, so this path needs a hub id (with network or a filled
hub cache) or a local folder, e.g. a DeBERTa/RoBERTa MNLI cross-encoder that
``AutoModelForSequenceClassification`` loads and whose ``config.id2label`` names an
*entailment* and a *contradiction* class.

Scoring: each answer sentence is a hypothesis, the reference is the premise (the longer of the
two is cut when the pair exceeds the model's length, usually the reference: long references
should be passed as their relevant passage). ``support`` = mean entailment probability over the answer's sentences,
``contradictions`` = sentences whose most likely class is contradiction,
``factual_consistency = support * 0.5 ** contradictions`` (as offline), ``coverage`` = mean
entailment of the reference's first sentences by the whole answer. Questions are not used: a
sentence that only restates the question is not entailed by the reference anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from medassist.errors import ModelError
from medassist.evaluation.factual import FactualScore
from medassist.evaluation.factual_facts import split_sentences


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or Path(name).expanduser().exists()


class NLIScorer:
    """Sentence-level entailment of an answer by its reference, with an MNLI-style classifier."""

    def __init__(self, model: str, device: str | None = None, batch_size: int = 16, max_length: int = 512,
                 contradiction_penalty: float = 0.5, coverage_sentences: int = 8):
        self.name, self.batch_size, self.max_length = model, batch_size, max_length
        self.penalty, self.coverage_sentences = contradiction_penalty, coverage_sentences
        if _looks_like_path(model) and not Path(model).expanduser().is_dir():
            raise ModelError(f"NLI model folder '{model}' does not exist; give a folder with config.json, "
                             "weights and tokenizer of an MNLI-style classifier, or a hub id")
        try:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            source = str(Path(model).expanduser()) if _looks_like_path(model) else model
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(source).eval()
        except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
            raise ModelError(f"NLI model '{model}' cannot be loaded ({type(exc).__name__}); it must be a local folder "
                             "or a reachable hub id of a sequence-classification (MNLI-style) model") from None
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", max_length),
                  getattr(self.tokenizer, "model_max_length", max_length)]
        self.max_length = min(int(x) for x in limits if x and x < 1_000_000)  # longer pairs lose premise tokens
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        self.entail = next((i for i, n in labels.items() if n.startswith("entail")), None)
        self.contra = next((i for i, n in labels.items() if n.startswith("contradict")), None)
        if self.entail is None or self.contra is None:
            raise ModelError(f"NLI model '{model}': config.id2label {sorted(labels.values())} does not name "
                             "'entailment' and 'contradiction' classes; is it an MNLI-style classifier?")

    def _probs(self, premises: list[str], hypotheses: list[str]) -> list[list[float]]:
        import torch

        out: list[list[float]] = []
        for start in range(0, len(premises), self.batch_size):
            batch = self.tokenizer(premises[start:start + self.batch_size], hypotheses[start:start + self.batch_size],
                                   truncation="longest_first", max_length=self.max_length, padding=True,
                                   return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**batch).logits.float()
            out += torch.softmax(logits, dim=-1).cpu().tolist()
        return out

    def score(self, answers: Sequence[str], references: Sequence[str],
              questions: Sequence[str] | None = None) -> list[FactualScore]:
        if len(answers) != len(references):
            raise ValueError("answers and references must have the same length")
        pairs: list[tuple[int, str, str, str]] = []  # (example, kind, premise, hypothesis)
        for i, (answer, reference) in enumerate(zip(answers, references)):
            for sent in split_sentences(answer or ""):
                pairs.append((i, "support", reference or "", sent))
            for sent in split_sentences(reference or "")[: self.coverage_sentences]:
                pairs.append((i, "coverage", answer or "", sent))
        probs = self._probs([p[2] for p in pairs], [p[3] for p in pairs]) if pairs else []
        per: list[dict] = [{"support": [], "coverage": [], "sup": [], "uns": [], "con": 0} for _ in answers]
        for (i, kind, _, hyp), p in zip(pairs, probs):
            per[i][kind].append(p[self.entail])
            if kind == "support":
                contradicted = max(range(len(p)), key=p.__getitem__) == self.contra
                per[i]["con"] += contradicted
                per[i]["sup" if p[self.entail] >= 0.5 else "uns"].append(hyp)
        results = []
        for d in per:
            support = sum(d["support"]) / len(d["support"]) if d["support"] else 0.0
            coverage = sum(d["coverage"]) / len(d["coverage"]) if d["coverage"] and d["support"] else 0.0
            results.append(FactualScore(round(support * self.penalty ** d["con"], 4), round(support, 4),
                                        round(coverage, 4), d["con"], unsupported=d["uns"], supported=d["sup"],
                                        n_facts=len(d["support"])))
        return results
