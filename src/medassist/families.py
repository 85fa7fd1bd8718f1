"""Model families: everything that differs between decoder-only and encoder-decoder models.

The family is chosen once, where a model is loaded (:mod:`medassist.models`), and travels as
a :class:`ModelFamily` object; no other module asks which family it holds. A family knows:

- how to load: its transformers Auto class, its PEFT task type, whether LoRA is the default;
- how examples become tensors: its formatter (:mod:`medassist.formatting`), the length that
  groups similar examples into batches, where generated tokens start in ``generate``'s output;
- the answer-only head: logits at supervised positions only, used by training, loss-only
  evaluation and perplexity alike (:meth:`ModelFamily.answer_logits`);
- its limits: position limits of the prompt and the answer, whether a chat keeps history,
  its Hub pipeline tag, and whether llama.cpp (GGUF) can run it.

To add a family (say, a vision-language model), subclass :class:`ModelFamily`, implement the
abstract methods, and register an instance in :data:`FAMILIES`; the config's ``model_type``
literal gains its name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from medassist.formatting import IGNORE_INDEX, DecoderOnlyFormat, Encoded, PromptFormat, Seq2SeqFormat

DECODER, ENCODER_DECODER, ENCODER = "decoder", "encoder-decoder", "encoder"


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_prune_head(model) -> bool:
    """True when the logits are a plain projection of the last hidden state, so applying the
    LM head to the answer positions alone gives exactly the full forward's logits there.
    Soft-capped (Gemma 2) or scaled (Cohere) logits are not: those models take the full path."""
    lm = _unwrap(model)
    if not (hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")):
        return False
    config = getattr(lm, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    return not scaled and lm.get_output_embeddings() is not None and lm.get_decoder() is not None


def chunked_head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """-log softmax(hidden @ weight.T)[target] of each row (fp32), ``chunk_size`` rows at a
    time: one chunk's rows x vocabulary logits exist at a time and none is kept for backward.

    The projection runs in the autocast dtype when autocast is on (as ``F.linear`` would), else
    in the weight's. A frozen ``weight`` (LoRA): each chunk's gradient w.r.t. its rows,
    (softmax - onehot) @ weight, is computed in the forward and kept (rows x hidden), then
    scaled by the incoming gradient in backward; exact, since a row's NLL depends on that row
    alone, and nothing is recomputed. A trainable ``weight``: each chunk is recomputed in
    backward (``torch.utils.checkpoint``).
    """
    import torch.nn.functional as F

    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    if hidden.shape[0] == 0:
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")
    if weight.requires_grad and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        def score(rows, labels):
            return F.cross_entropy(F.linear(rows, weight).float(), labels, reduction="none")

        return torch.cat([checkpoint(score, hidden[s:s + chunk_size], targets[s:s + chunk_size], use_reentrant=False)
                          for s in range(0, hidden.shape[0], chunk_size)])
    return _FrozenHeadNLL.apply(hidden, weight, targets, chunk_size, dtype)


class _FrozenHeadNLL(torch.autograd.Function):
    """:func:`chunked_head_nll` for a frozen head: the gradient is computed chunk by chunk in
    the forward, so backward is one multiplication."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, dtype):
        import torch.nn.functional as F

        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.detach().to(dtype)
            nll = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for s in range(0, targets.shape[0], chunk_size):
                labels = targets[s:s + chunk_size]
                logits = F.linear(hidden[s:s + chunk_size].detach().to(dtype), w).float()
                lse = torch.logsumexp(logits, dim=-1)
                nll[s:s + chunk_size] = lse - logits.gather(1, labels[:, None]).squeeze(1)
                if grad is not None:
                    probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(labels.shape[0], device=probs.device), labels] -= 1.0
                    grad[s:s + chunk_size] = (probs.to(dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll[:, None].to(grad.dtype), None, None, None, None


def _limit(config: Any) -> int | None:
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if isinstance(value, int) and value > 0 else None


class ModelFamily(ABC):
    """What one model family does its own way. Instances are stateless singletons."""

    name: ClassVar[str]
    auto_class_name: ClassVar[str]  # transformers Auto class that loads it
    peft_task_type: ClassVar[str]  # peft.TaskType member name
    lora_by_default: ClassVar[bool]
    keeps_history: ClassVar[bool]  # a chat sends earlier turns with each question
    pipeline_tag: ClassVar[str]  # Hugging Face Hub task
    gguf_refusal: ClassVar[str | None] = None  # why llama.cpp cannot run it; None = it can

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- loading ----------------------------------------------------------------------
    def auto_class(self):
        import transformers

        return getattr(transformers, self.auto_class_name)

    def peft_auto_class(self):
        import peft

        return getattr(peft, "AutoPeftModelFor" + self.auto_class_name.removeprefix("AutoModelFor"))

    def peft_task(self):
        from peft import TaskType

        return getattr(TaskType, self.peft_task_type)

    def prepare(self, model, tokenizer) -> None:
        """Fill ids a checkpoint leaves unset, so formatting and ``generate`` agree."""
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id

    # -- tensors ----------------------------------------------------------------------
    @abstractmethod
    def make_format(self, tokenizer, cfg=None, truncate_prompt: bool = True) -> PromptFormat:
        """The formatter, with the lengths and prompt settings of a TrainConfig (or defaults)."""

    @abstractmethod
    def sample_length(self, enc: Encoded) -> int:
        """What length-grouped batching sorts by (the cost of the example)."""

    @abstractmethod
    def new_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The generated tokens in ``generate``'s output for prompts ``prompt_width`` wide."""

    @abstractmethod
    def answer_logits(self, model, batch: dict[str, torch.Tensor], prune_head: bool | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, targets)`` at every supervised position of a ``collate`` batch, never
        building a batch x length x vocabulary tensor where it can be avoided."""

    def answer_nll(self, model, batch: dict[str, torch.Tensor], prune_head: bool | None = None,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nll, targets)``: -log p(target), fp32, at every supervised position, in the order
        of :meth:`answer_logits` (``F.cross_entropy`` of its logits). ``chunk_size``: where the
        family prunes the head, score at most that many positions at a time, so the positions x
        vocabulary logits never exist at once (:func:`chunked_head_nll`); None = all at once."""
        import torch.nn.functional as F

        logits, targets = self.answer_logits(model, batch, prune_head)
        return F.cross_entropy(logits, targets, reduction="none"), targets

    def answer_scores(self, model, batch: dict[str, torch.Tensor], prune_head: bool | None = None,
                      chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nll, correct, targets)`` at every supervised position, for evaluation (no
        gradients): -log p(target) (fp32) and whether the target is the argmax, in the order of
        :meth:`answer_logits`; with ``chunk_size`` as in :meth:`answer_nll`."""
        import torch.nn.functional as F

        logits, targets = self.answer_logits(model, batch, prune_head)
        return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets, targets

    # -- limits -----------------------------------------------------------------------
    @abstractmethod
    def position_limits(self, model) -> tuple[int | None, int | None]:
        """(most prompt tokens, most answer tokens or prompt + answer) the model can read."""

    @abstractmethod
    def length_problem(self, model, n_prompt: int, max_new_tokens: int) -> str | None:
        """Why a prompt of ``n_prompt`` tokens plus ``max_new_tokens`` does not fit, or None."""


class DecoderOnly(ModelFamily):
    name = DECODER
    auto_class_name = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    lora_by_default = True
    keeps_history = True
    pipeline_tag = "text-generation"

    def make_format(self, tokenizer, cfg=None, truncate_prompt: bool = True) -> DecoderOnlyFormat:
        from medassist.config import TrainConfig

        cfg = cfg or TrainConfig()
        return DecoderOnlyFormat(tokenizer, cfg.max_length, cfg.prompt_format, cfg.system_prompt,
                                 cfg.max_prompt_fraction, cfg.answer_truncation, truncate_prompt)

    def sample_length(self, enc: Encoded) -> int:
        return len(enc.input_ids)

    def new_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return sequences[:, prompt_width:]  # the prompt columns come back first

    def answer_logits(self, model, batch, prune_head=None):
        if prune_head is None:
            prune_head = can_prune_head(model)
        if prune_head:
            hidden, targets = self._answer_hidden(model, batch)
            return _unwrap(model).get_output_embeddings()(hidden).float(), targets
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).logits[:, :-1][keep]
        return logits.float(), targets[keep]

    def answer_nll(self, model, batch, prune_head=None, chunk_size=None):
        if prune_head is None:
            prune_head = can_prune_head(model)
        head = _unwrap(model).get_output_embeddings() if prune_head else None
        if not chunk_size or head is None or getattr(head, "bias", None) is not None:
            return super().answer_nll(model, batch, prune_head)
        hidden, targets = self._answer_hidden(model, batch)
        return chunked_head_nll(hidden, head.weight, targets, chunk_size), targets

    def answer_scores(self, model, batch, prune_head=None, chunk_size=None):
        if prune_head is None:
            prune_head = can_prune_head(model)
        head = _unwrap(model).get_output_embeddings() if prune_head else None
        if not chunk_size or head is None:
            return super().answer_scores(model, batch, prune_head)
        with torch.no_grad():
            hidden, targets = self._answer_hidden(model, batch)
            nll = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
            correct = torch.empty(targets.shape[0], dtype=torch.bool, device=hidden.device)
            for s in range(0, targets.shape[0], chunk_size):
                logits, labels = head(hidden[s:s + chunk_size]).float(), targets[s:s + chunk_size]
                nll[s:s + chunk_size] = torch.logsumexp(logits, -1) - logits.gather(1, labels[:, None]).squeeze(1)
                correct[s:s + chunk_size] = logits.argmax(-1) == labels
        return nll, correct, targets

    def _answer_hidden(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The last hidden state at the positions that predict a supervised label, and those labels."""
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        # use_cache=False: a teacher-forced forward has no use for the KV cache it would build
        hidden = _unwrap(model).get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                              use_cache=False).last_hidden_state
        return hidden[:, :-1][keep], targets[keep]

    def position_limits(self, model):
        return None, _limit(getattr(model, "config", None))

    def length_problem(self, model, n_prompt, max_new_tokens):
        _, context = self.position_limits(model)
        if context and n_prompt + max_new_tokens > context:
            return (f"prompt ({n_prompt} tokens) + max tokens ({max_new_tokens}) exceed the model's "
                    f"context of {context} tokens")
        return None


class EncoderDecoder(ModelFamily):
    name = ENCODER_DECODER
    auto_class_name = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    lora_by_default = False  # small seq2seq models fine-tune fully
    keeps_history = False  # trained on single questions: each is answered on its own
    pipeline_tag = "text2text-generation"
    gguf_refusal = ("llama.cpp's support for encoder-decoder models (T5 only, no BART or BERT2BERT, no "
                    "chat template) is too limited to run this model; export without --gguf and serve it "
                    "with `medassist serve` or transformers")

    def prepare(self, model, tokenizer) -> None:
        if tokenizer.eos_token is None and tokenizer.sep_token is not None:
            tokenizer.eos_token = tokenizer.sep_token
        super().prepare(model, tokenizer)

    def make_format(self, tokenizer, cfg=None, truncate_prompt: bool = True) -> Seq2SeqFormat:
        from medassist.config import TrainConfig

        cfg = cfg or TrainConfig()
        return Seq2SeqFormat(tokenizer, cfg.max_source_length, cfg.max_target_length, cfg.source_prefix,
                             cfg.answer_truncation, truncate_prompt)

    def sample_length(self, enc: Encoded) -> int:
        return len(enc.input_ids) + len(enc.labels)

    def new_tokens(self, sequences: torch.Tensor, prompt_width: int) -> torch.Tensor:
        return sequences[:, 1:]  # after the decoder start token

    def answer_logits(self, model, batch, prune_head=None):
        labels = batch["labels"]
        keep = labels != IGNORE_INDEX
        decoder_input_ids = _unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder_input_ids, use_cache=False).logits
        return logits[keep].float(), labels[keep]

    def position_limits(self, model):
        config = getattr(model, "config", None)
        return _limit(getattr(config, "encoder", config)), _limit(getattr(config, "decoder", None))

    def length_problem(self, model, n_prompt, max_new_tokens):
        source, target = self.position_limits(model)
        if source and n_prompt > source:
            return f"the prompt is {n_prompt} tokens; the model reads at most {source}"
        if target and max_new_tokens >= target:
            return f"max tokens ({max_new_tokens}) must be below the model's {target}"
        return None


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (DecoderOnly(), EncoderDecoder())}


def get_family(name: str | ModelFamily) -> ModelFamily:
    if isinstance(name, ModelFamily):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family '{name}' (known: {', '.join(FAMILIES)})") from None


def family_of(hf_config) -> ModelFamily:
    """The family of a transformers config (``is_encoder_decoder``)."""
    return FAMILIES[ENCODER_DECODER if getattr(hf_config, "is_encoder_decoder", False) else DECODER]
