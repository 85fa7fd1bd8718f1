"""Generation: answers from prompts only, batched, for evaluation and serving alike.

The functions here take *prompts* (token ids, or questions that the formatter turns into
prompt ids); they never see a reference answer, so nothing of the answer can leak into what
the model is asked. Batches are sorted by prompt length (little padding), padded the way the
family needs (decoder-only: left, so every prompt ends where generation starts;
encoder-decoder: right, on the encoder side), generated with the KV cache, greedy unless
sampling is asked for, and stopped at EOS. Results come back in the caller's order, with
the number of tokens each answer took and whether it ran into ``max_new_tokens``.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from medassist.formatting import Format


@dataclass
class GenerationSettings:
    """How answers are generated; the defaults are greedy decoding.

    ``max_new_tokens``: most tokens per answer (EOS included). ``do_sample``: sample instead
    of greedy; ``temperature`` and ``top_p`` apply only then. ``batch_size``: prompts per
    ``generate`` call. ``seed``: when sampling, the torch seed for the whole call
    (reproducible for a given batch composition).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int | None = None

    @classmethod
    def from_eval_config(cls, ecfg, seed: int | None = None) -> "GenerationSettings":
        """Settings from a :class:`~medassist.config.EvalConfig` section."""
        return cls(
            max_new_tokens=ecfg.max_new_tokens, do_sample=ecfg.do_sample, temperature=ecfg.temperature,
            top_p=ecfg.top_p, batch_size=ecfg.batch_size, seed=seed,
        )


@dataclass
class Generated:
    """Answers in the caller's order.

    ``new_tokens[i]``: tokens of answer *i* before its EOS (the EOS is not counted).
    ``hit_max_new_tokens[i]``: answer *i* produced no EOS within ``max_new_tokens``: it was cut.
    """

    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    hit_max_new_tokens: list[bool] = field(default_factory=list)

    @property
    def mean_new_tokens(self) -> float:
        return sum(self.new_tokens) / len(self.new_tokens) if self.new_tokens else 0.0

    @property
    def share_hit_max_new_tokens(self) -> float:
        return sum(self.hit_max_new_tokens) / len(self.hit_max_new_tokens) if self.hit_max_new_tokens else 0.0


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless stub
        return torch.device("cpu")


def stop_ids(model, fmt: Format) -> list[int]:
    """The formatter's EOS plus any other EOS the model's generation config declares."""
    ids = [fmt.eos_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in extra if isinstance(extra, (list, tuple)) else [extra]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def _generation_config(model, fmt: Format, settings: GenerationSettings):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.max_new_tokens = settings.max_new_tokens
    config.max_length = None  # max_new_tokens alone bounds the answer
    config.min_length = 0
    config.min_new_tokens = None
    config.num_beams = 1
    config.do_sample = settings.do_sample
    # greedy ignores these; clearing them keeps transformers from warning about unused settings
    config.temperature = settings.temperature if settings.do_sample else None
    config.top_p = settings.top_p if settings.do_sample else None
    config.top_k = None if not settings.do_sample else config.top_k
    config.eos_token_id = stop_ids(model, fmt)
    config.pad_token_id = fmt.pad_id
    config.use_cache = True
    return config


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length, longest first (memory trouble shows at once), in batches."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_from_ids(
    model,
    fmt: Format,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> Generated:
    """Generate one answer per prompt (token ids from ``fmt.prompt_ids``).

    ``progress`` is called with the number of prompts finished after each batch (e.g. a
    tqdm bar's ``update``). The model is used as it is (train/eval mode, device); callers
    that train switch it to eval mode first (see ``evaluation``).
    """
    settings = settings or GenerationSettings()
    n = len(prompts)
    out = Generated(texts=[""] * n, token_ids=[[] for _ in range(n)], new_tokens=[0] * n,
                    hit_max_new_tokens=[False] * n)
    if n == 0:
        return out
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = _generation_config(model, fmt, settings)
    stops = torch.tensor(config.eos_token_id)
    device = model_device(model)
    rng = torch.random.fork_rng(devices=[]) if settings.do_sample and settings.seed is not None else nullcontext()
    with rng, torch.inference_mode():
        if settings.do_sample and settings.seed is not None:
            torch.manual_seed(settings.seed)
        for batch in _length_batches([len(p) for p in prompts], settings.batch_size):
            inputs = fmt.collate_prompts([list(prompts[i]) for i in batch])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            sequences = model.generate(**inputs, generation_config=config)
            # decoder-only: the prompt columns come back first; encoder-decoder: the decoder start token
            start = inputs["input_ids"].shape[1] if fmt.family == "decoder" else 1
            new = sequences[:, start:].cpu()
            for row, i in enumerate(batch):
                ids = new[row].tolist()
                is_stop = torch.isin(new[row], stops).nonzero()
                end = int(is_stop[0]) if len(is_stop) else len(ids)
                out.token_ids[i] = ids[:end]
                out.new_tokens[i] = end
                out.hit_max_new_tokens[i] = not len(is_stop)
                out.texts[i] = fmt.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
            if progress is not None:
                progress(len(batch))
    return out


def generate_answers(
    model,
    fmt: Format,
    questions: Sequence[str],
    settings: GenerationSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> Generated:
    """Answer questions: each becomes ``fmt.prompt_ids(question)``, and nothing else goes in."""
    return generate_from_ids(model, fmt, [fmt.prompt_ids(q) for q in questions], settings, progress)
