"""Formatting: how a question (with optional sources) and an answer become tokens and a loss mask.

One interface, :class:`PromptFormat`, with one implementation per way of feeding a model
(the model family picks which one, in :mod:`medassist.families`):

- :class:`DecoderOnlyFormat`: ``prompt + answer + EOS`` in one sequence. The prompt and the
  answer are tokenized *separately* and the mask is made by length (``len(prompt_ids)``),
  never by searching for a template string, so labels are -100 on every prompt and padding
  position and equal the input ids on every answer token and on the EOS.
- :class:`Seq2SeqFormat`: the question is the encoder's source, ``answer + EOS`` the target;
  labels are padded with -100 (never the pad id) to the longest target of the batch.

Text typed by a user (questions, answers, sources) is always tokenized as *text*: a
``<|im_end|>`` inside a question stays the characters, never the control token, so nobody can
inject a system or assistant turn.

A too-long answer is cut by ``answer_truncation``: ``eos`` cuts anywhere and keeps the EOS
(the model learns to stop), ``sentence`` cuts at the last sentence end that fits and keeps the
EOS, ``no_eos`` cuts anywhere and drops the EOS (the model is never taught to stop mid-answer).
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

import torch

from medassist.errors import ModelError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
AnswerTruncation = Literal["eos", "sentence", "no_eos"]
History = Sequence[tuple[str, str]]
_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in real text
_SENTENCE_END = re.compile(r"[.!?;:](?=\s|$)|\n")


@dataclass(frozen=True)
class Passage:
    """A source shown in a prompt: a passage of vetted text with where it came from."""

    text: str
    title: str = ""
    url: str = ""
    score: float | None = None


def sources_text(passages: Sequence[Passage]) -> str:
    """Numbered sources, one per line: ``[1] title: text``."""
    lines = [f"[{i}] {p.title + ': ' if p.title else ''}{p.text}" for i, p in enumerate(passages, 1)]
    return "Sources:\n" + "\n".join(lines)


def user_text(question: str, passages: Sequence[Passage] = ()) -> str:
    """The user's turn: the question alone, or numbered sources then the question."""
    return f"{sources_text(passages)}\n\nQuestion: {question}" if passages else question


@dataclass
class Encoded:
    """One tokenized example; ``truncated``: the answer was cut to fit."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise ModelError(f"tokenizer {type(tokenizer).__name__} has no EOS (or SEP) token to end answers with")
    return int(eos)


def pad_batch(seqs: Sequence[Sequence[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    rows = [([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s)))
            for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


class PromptFormat(ABC):
    """What every family's formatter offers: prompts, encoded examples, batches, the mask view.

    ``prompt_padding``: the side generation batches are padded on (decoder-only: left, so every
    prompt ends where generation starts; encoder-decoder: right, on the encoder side).
    ``truncate_prompt``: cut over-long prompts to the training limits (training, evaluation);
    serving passes False and checks lengths itself, because a clear error beats a silently cut
    question.
    """

    prompt_padding: ClassVar[str] = "left"
    uses_chat_template: bool = False

    def __init__(self, tokenizer, system_prompt: str | None = None, answer_truncation: AnswerTruncation = "eos",
                 truncate_prompt: bool = True) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.answer_truncation = answer_truncation
        self.truncate_prompt = truncate_prompt
        self.eos_id = _eos_id(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos_id

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def prompt_ids(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> list[int]:
        """The tokens a model is given to answer ``question`` (never any of the answer)."""

    @abstractmethod
    def encode(self, question: str, answer: str, passages: Sequence[Passage] = ()) -> Encoded | None:
        """Input ids and labels of one training example; None when no answer token fits."""

    @abstractmethod
    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch from ``{"input_ids", "labels"}`` features."""

    @abstractmethod
    def mask_rows(self, enc: Encoded) -> list[tuple[str, list[tuple[int, bool]]]]:
        """How to show an example: named rows of (token id, trained?)."""

    # -- shared -------------------------------------------------------------------------
    def fit_passages(self, question: str, history: History = (), passages: Sequence[Passage] = ()
                     ) -> list[Passage]:
        """The sources that reach the model whole in :meth:`prompt_ids` (all, unless cut to fit)."""
        return list(passages)

    def with_system_prompt(self, system_prompt: str | None) -> "PromptFormat":
        other = copy.copy(self)
        other.system_prompt = system_prompt or None
        return other

    def text_ids(self, text: str) -> list[int]:
        """Tokens of user-supplied text: special-token strings in it stay plain text."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def collate_prompts(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        return {"input_ids": pad_batch(prompts, self.pad_id, self.prompt_padding),
                "attention_mask": pad_batch([[1] * len(p) for p in prompts], 0, self.prompt_padding)}

    def fit_answer(self, answer: str, budget: int) -> tuple[list[int], bool, bool]:
        """``(answer tokens, end with EOS?, truncated?)`` for ``budget`` places (EOS included)."""
        ids = self.text_ids(answer)
        if len(ids) + 1 <= budget:
            return ids, True, False
        if self.answer_truncation == "no_eos":
            return ids[: max(0, budget)], False, True
        cut = max(0, budget - 1)
        if self.answer_truncation == "sentence":
            cut = self._sentence_cut(answer, cut) or cut
        return ids[:cut], True, True

    def _sentence_cut(self, answer: str, limit: int) -> int | None:
        """The most answer tokens (<= limit) that end at a sentence end, or None."""
        try:
            offsets = self.tokenizer(answer, add_special_tokens=False, split_special_tokens=True,
                                     return_offsets_mapping=True).offset_mapping
        except (NotImplementedError, ValueError):  # slow tokenizers have no offsets
            return None
        ends = {m.end() for m in _SENTENCE_END.finditer(answer)}
        for k in range(min(limit, len(offsets)), 0, -1):
            if offsets[k - 1][1] in ends:
                return k
        return None


class DecoderOnlyFormat(PromptFormat):
    """Causal LM examples: the tokenizer's chat template when it has one, else a plain prompt."""

    prompt_padding = "left"

    def __init__(self, tokenizer, max_length: int = 256, prompt_format: str = "auto",
                 system_prompt: str | None = None, max_prompt_fraction: float = 0.5,
                 answer_truncation: AnswerTruncation = "eos", truncate_prompt: bool = True) -> None:
        super().__init__(tokenizer, system_prompt, answer_truncation, truncate_prompt)
        if prompt_format == "chat" and not tokenizer.chat_template:
            raise ModelError("prompt_format: chat, but this tokenizer has no chat template")
        self.uses_chat_template = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
        self.max_length = max_length
        self.max_prompt_tokens = max(1, int(max_length * max_prompt_fraction))
        bos = tokenizer.bos_token_id
        # plain prompts start with BOS where the tokenizer itself would add one (Llama-style)
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self._plain_prefix = [bos] if adds_bos else []
        self._specials = [t for t in tokenizer.all_special_tokens if t] + list(
            getattr(tokenizer, "added_tokens_encoder", {}) or {})

    # -- text ---------------------------------------------------------------------------
    def messages(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in history:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return msgs + [{"role": "user", "content": user_text(question, passages)}]

    def prompt_text(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                self.messages(question, history, passages), tokenize=False, add_generation_prompt=True)
        text = "".join(PLAIN_TEMPLATE.format(question=u) + a + "\n\n" for u, a in history)
        text += PLAIN_TEMPLATE.format(question=user_text(question, passages))
        return (f"{self.system_prompt}\n\n" + text) if self.system_prompt else text

    def _render(self, question: str, history: History, passages: Sequence[Passage]) -> list[int]:
        if not self.uses_chat_template:
            return self._plain_prefix + self.text_ids(self.prompt_text(question, history, passages))
        msgs = self.messages(question, history, passages)
        if not any(s in m["content"] for m in msgs for s in self._specials):
            return self.tokenizer(self.prompt_text(question, history, passages), add_special_tokens=False).input_ids
        # a message holds a control-token string: render with placeholders and tokenize the
        # contents as plain text, so the string cannot become a control token
        marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(msgs)]
        text = self.tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
        ids: list[int] = []
        for k, part in enumerate(_SENTINEL.split(text)):
            if k % 2:
                ids += self.text_ids(msgs[int(part)]["content"])
            elif part:
                ids += self.tokenizer(part, add_special_tokens=False).input_ids
        return ids

    # -- tokens -------------------------------------------------------------------------
    def fit_passages(self, question: str, history: History = (), passages: Sequence[Passage] = ()
                     ) -> list[Passage]:
        """The sources :meth:`prompt_ids` keeps: over budget, they are dropped from the last."""
        passages = list(passages)
        if not self.truncate_prompt:
            return passages
        while passages and len(self._render(question, history, passages)) > self.max_prompt_tokens:
            passages.pop()
        return passages

    def prompt_ids(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> list[int]:
        """Prompt tokens. Over budget, sources are dropped from the last, then the question is
        cut (keeping the template around it)."""
        passages = self.fit_passages(question, history, passages)
        ids = self._render(question, history, passages)
        if not self.truncate_prompt or len(ids) <= self.max_prompt_tokens:
            return ids
        q_ids = self.text_ids(question)
        keep = max(0, self.max_prompt_tokens - (len(ids) - len(q_ids)))
        for _ in range(8):  # decode/re-encode can shift a token or two; shrink until it fits
            ids = self._render(self.tokenizer.decode(q_ids[:keep], skip_special_tokens=True), history, passages)
            if len(ids) <= self.max_prompt_tokens or keep == 0:
                break
            keep = max(0, keep - (len(ids) - self.max_prompt_tokens))
        return ids

    def encode(self, question: str, answer: str, passages: Sequence[Passage] = ()) -> Encoded | None:
        prompt = self.prompt_ids(question, passages=passages)
        answer_ids, eos, truncated = self.fit_answer(answer, self.max_length - len(prompt))
        if not answer_ids:
            return None
        completion = answer_ids + ([self.eos_id] if eos else [])
        return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, truncated)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch, padded to the longest sequence in the batch."""
        ids = [f["input_ids"] for f in features]
        return {"input_ids": pad_batch(ids, self.pad_id, "right"),
                "attention_mask": pad_batch([[1] * len(s) for s in ids], 0, "right"),
                "labels": pad_batch([f["labels"] for f in features], IGNORE_INDEX, "right")}

    def mask_rows(self, enc: Encoded) -> list[tuple[str, list[tuple[int, bool]]]]:
        return [("", [(t, label != IGNORE_INDEX) for t, label in zip(enc.input_ids, enc.labels)])]


class Seq2SeqFormat(PromptFormat):
    """Encoder-decoder examples: source = prefix + question (+ sources), target = answer + EOS."""

    prompt_padding = "right"

    def __init__(self, tokenizer, max_source_length: int = 128, max_target_length: int = 192,
                 source_prefix: str = "", answer_truncation: AnswerTruncation = "eos",
                 truncate_prompt: bool = True) -> None:
        super().__init__(tokenizer, None, answer_truncation, truncate_prompt)
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.source_prefix = source_prefix

    def with_system_prompt(self, system_prompt: str | None) -> "Seq2SeqFormat":
        return self  # encoder-decoder models were trained without one

    def prompt_text(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> str:
        # the question first, so the tokenizer's truncation cuts sources, never the question
        text = self.source_prefix + question
        return f"{text}\n\n{sources_text(passages)}" if passages else text

    def fit_passages(self, question: str, history: History = (), passages: Sequence[Passage] = ()
                     ) -> list[Passage]:
        """The sources whose whole text fits before the tokenizer's truncation cuts the source."""
        passages = list(passages)
        if not self.truncate_prompt:
            return passages
        while passages and len(self.tokenizer(self.prompt_text(question, passages=passages),
                                              return_token_type_ids=False, split_special_tokens=True
                                              ).input_ids) > self.max_source_length:
            passages.pop()
        return passages

    def prompt_ids(self, question: str, history: History = (), passages: Sequence[Passage] = ()) -> list[int]:
        # the tokenizer's own truncation keeps its closing special token (</s> or [SEP])
        limit = self.max_source_length if self.truncate_prompt else None
        return self.tokenizer(self.prompt_text(question, passages=passages), truncation=limit is not None,
                              max_length=limit, return_token_type_ids=False, split_special_tokens=True).input_ids

    def encode(self, question: str, answer: str, passages: Sequence[Passage] = ()) -> Encoded | None:
        answer_ids, eos, truncated = self.fit_answer(answer, self.max_target_length)
        if not answer_ids:
            return None
        return Encoded(self.prompt_ids(question, passages=passages), answer_ids + ([self.eos_id] if eos else []),
                       truncated)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Sources padded with the pad id, targets with -100, each to the longest in this batch."""
        batch = self.collate_prompts([f["input_ids"] for f in features])
        batch["labels"] = pad_batch([f["labels"] for f in features], IGNORE_INDEX, "right")
        return batch

    def mask_rows(self, enc: Encoded) -> list[tuple[str, list[tuple[int, bool]]]]:
        return [("source (masked): ", [(t, False) for t in enc.input_ids]),
                ("target (trained): ", [(t, True) for t in enc.labels])]


def render_mask(fmt: PromptFormat, question: str, answer: str, color: bool = True,
                passages: Sequence[Passage] = ()) -> str:
    """Every token of an encoded example, marked as trained (green / ``[[...]]``) or masked (dim)."""
    enc = fmt.encode(question, answer, passages)
    if enc is None:
        return "(no answer token fits: this example would be dropped)"
    tok = fmt.tokenizer

    def piece(token_id: int, trained: bool) -> str:
        text = tok.decode([token_id]).replace("\n", "\\n") or tok.convert_ids_to_tokens(token_id)
        if not trained:
            return f"\x1b[2m{text}\x1b[0m" if color else text
        return f"\x1b[32;1m{text}\x1b[0m" if color else f"[[{text}]]"

    return "\n".join(name + "".join(piece(t, trained) for t, trained in row) for name, row in fmt.mask_rows(enc))
