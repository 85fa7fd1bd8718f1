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
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        if prune_head is None:
            prune_head = can_prune_head(model)
        if prune_head:
            lm = _unwrap(model)
            # use_cache=False: a teacher-forced forward has no use for the KV cache it would build
            hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      use_cache=False).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits[:, :-1][keep]
        return logits.float(), targets[keep]

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
