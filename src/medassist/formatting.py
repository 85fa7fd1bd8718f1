"""Formatting: how a question/answer pair becomes tensors, one class per model family.

This is the one place where the two families differ in what they feed the model:

- :class:`DecoderOnlyFormat`: ``prompt + answer + EOS`` in one sequence. The prompt and the
  answer are tokenized *separately* and the mask is made by length (``len(prompt_ids)``),
  never by searching for a template string, so labels are -100 on every prompt and padding
  position and equal the input ids on every answer token and on the EOS. Training batches
  are right-padded; generation batches are left-padded so every prompt ends where generation
  starts.
- :class:`Seq2SeqFormat`: the question is the encoder's source, ``answer + EOS`` the target;
  labels are padded with -100 (never the pad id) to the longest target of the batch.

Both keep the EOS when they cut an answer, so a model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from medassist.errors import ModelError

IGNORE_INDEX = -100
PLAIN_TEMPLATE = "Question: {question}\nAnswer: "
PLAIN_TEMPLATE_WITH_SYSTEM = "{system}\n\nQuestion: {question}\nAnswer: "


@dataclass
class Encoded:
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


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else _eos_id(tokenizer)


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str, multiple: int | None = None) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    if multiple:
        width = -(-width // multiple) * multiple
    rows = []
    for s in seqs:
        fill = [value] * (width - len(s))
        rows.append(fill + list(s) if side == "left" else list(s) + fill)
    return torch.tensor(rows, dtype=torch.long)


class DecoderOnlyFormat:
    """Decoder-only (causal LM) examples: chat template when the tokenizer has one, else plain."""

    family = "decoder"

    def __init__(
        self,
        tokenizer,
        max_length: int = 256,
        prompt_format: str = "auto",
        system_prompt: str | None = None,
        max_prompt_fraction: float = 0.5,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        use_chat = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
        if prompt_format == "chat" and not tokenizer.chat_template:
            raise ModelError("prompt_format: chat, but this tokenizer has no chat template")
        self.uses_chat_template = use_chat
        self.system_prompt = system_prompt
        self.max_prompt_tokens = max(1, int(max_length * max_prompt_fraction))
        self.eos_id = _eos_id(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        bos = tokenizer.bos_token_id
        # Plain prompts start with BOS where the tokenizer itself would add one (Llama-style).
        adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [bos]
        self._plain_prefix = [bos] if adds_bos else []

    # -- text ---------------------------------------------------------------------------
    def messages(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for user, assistant in history:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return msgs + [{"role": "user", "content": question}]

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(
                self.messages(question, history), tokenize=False, add_generation_prompt=True
            )
        text = ""
        for user, assistant in history:
            text += PLAIN_TEMPLATE.format(question=user) + assistant + "\n\n"
        template = PLAIN_TEMPLATE_WITH_SYSTEM if (self.system_prompt and not history) else PLAIN_TEMPLATE
        return text + template.format(question=question, system=self.system_prompt)

    def _render(self, question: str, history=()) -> list[int]:
        ids = self.tokenizer(self.prompt_text(question, history), add_special_tokens=False).input_ids
        return ids if self.uses_chat_template else self._plain_prefix + ids

    # -- tokens -------------------------------------------------------------------------
    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Prompt tokens, with the question cut (keeping the template around it) when over budget."""
        ids = self._render(question, history)
        if len(ids) <= self.max_prompt_tokens:
            return ids
        q_ids = self.tokenizer(question, add_special_tokens=False).input_ids
        overhead = len(ids) - len(q_ids)
        keep = max(0, self.max_prompt_tokens - overhead)
        for _ in range(8):  # decode/re-encode can shift a token or two; shrink until it fits
            ids = self._render(self.tokenizer.decode(q_ids[:keep], skip_special_tokens=True), history)
            if len(ids) <= self.max_prompt_tokens or keep == 0:
                break
            keep = max(0, keep - (len(ids) - self.max_prompt_tokens))
        return ids

    def encode(self, question: str, answer: str) -> Encoded | None:
        """``prompt + answer + EOS`` with labels; None when no answer token fits."""
        prompt = self.prompt_ids(question)
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        budget = self.max_length - len(prompt) - 1  # one place is always kept for EOS
        truncated = len(answer_ids) > budget
        answer_ids = answer_ids[: max(0, budget)]
        if not answer_ids:
            return None
        completion = answer_ids + [self.eos_id]
        return Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, truncated)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded training batch, padded to the longest sequence in the batch."""
        ids = [f["input_ids"] for f in features]
        return {
            "input_ids": _pad(ids, self.pad_id, "right"),
            "attention_mask": _pad([[1] * len(s) for s in ids], 0, "right"),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX, "right"),
        }

    def collate_prompts(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded generation batch: every prompt ends at the last column."""
        return {
            "input_ids": _pad(prompts, self.pad_id, "left"),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, "left"),
        }


class Seq2SeqFormat:
    """Encoder-decoder examples: source = prefix + question, target = answer + EOS."""

    family = "encoder-decoder"

    def __init__(
        self,
        tokenizer,
        max_source_length: int = 128,
        max_target_length: int = 192,
        source_prefix: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.source_prefix = source_prefix
        self.eos_id = _eos_id(tokenizer)
        self.pad_id = _pad_id(tokenizer)
        self.uses_chat_template = False
        self.system_prompt = None

    def prompt_text(self, question: str, history: Sequence[tuple[str, str]] = ()) -> str:
        return self.source_prefix + question

    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        # the tokenizer's own truncation keeps its closing special token (</s> or [SEP])
        return self.tokenizer(
            self.prompt_text(question), truncation=True, max_length=self.max_source_length,
            return_token_type_ids=False,
        ).input_ids

    def encode(self, question: str, answer: str) -> Encoded | None:
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        budget = self.max_target_length - 1
        truncated = len(answer_ids) > budget
        answer_ids = answer_ids[:budget]
        if not answer_ids:
            return None
        return Encoded(self.prompt_ids(question), answer_ids + [self.eos_id], truncated)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Sources padded with pad id, targets with -100, each to the longest in this batch."""
        batch = self.collate_prompts([f["input_ids"] for f in features])
        batch["labels"] = _pad([f["labels"] for f in features], IGNORE_INDEX, "right")
        return batch

    def collate_prompts(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": _pad(prompts, self.pad_id, "right"),
            "attention_mask": _pad([[1] * len(p) for p in prompts], 0, "right"),
        }


Format = DecoderOnlyFormat | Seq2SeqFormat


def make_format(family: str, tokenizer, cfg=None) -> Format:
    """The formatter for a family, with the lengths and prompt settings of a TrainConfig."""
    from medassist.config import TrainConfig

    cfg = cfg or TrainConfig()
    if family == "encoder-decoder":
        return Seq2SeqFormat(tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.source_prefix)
    return DecoderOnlyFormat(
        tokenizer, cfg.max_length, cfg.prompt_format, cfg.system_prompt, cfg.max_prompt_fraction
    )


def render_mask(fmt: Format, question: str, answer: str, color: bool = True) -> str:
    """Show every token of an encoded example, marked as trained (answer/EOS) or masked.

    Decoder-only: the one sequence, trained tokens in green ``[[...]]``, masked ones dim.
    Encoder-decoder: the source (never trained) and the target (all trained) on two lines.
    """
    enc = fmt.encode(question, answer)
    if enc is None:
        return "(no answer token fits: this example would be dropped)"
    tok = fmt.tokenizer

    def piece(token_id: int, trained: bool) -> str:
        text = tok.decode([token_id]).replace("\n", "\\n") or tok.convert_ids_to_tokens(token_id)
        if not trained:
            return f"\x1b[2m{text}\x1b[0m" if color else text
        return f"\x1b[32;1m{text}\x1b[0m" if color else f"[[{text}]]"

    if isinstance(fmt, Seq2SeqFormat):
        src = "".join(piece(t, False) for t in enc.input_ids)
        tgt = "".join(piece(t, True) for t in enc.labels)
        return f"source (masked): {src}\ntarget (trained): {tgt}"
    return "".join(piece(t, label != IGNORE_INDEX) for t, label in zip(enc.input_ids, enc.labels))
