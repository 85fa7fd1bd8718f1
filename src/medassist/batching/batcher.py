"""The continuous batch (:class:`Batcher`): rows join between decoding steps and leave the
step they end; each step prefills new rows together and decodes one token for every row,
through a :class:`~medassist.batching.cache.SlotCache` handed to the model as its ``cache``.
:func:`batching_problem` says which models it takes. The design: :mod:`medassist.batching`.
"""

from __future__ import annotations

import collections
import inspect
import logging
from typing import TYPE_CHECKING

import torch

from medassist.batching.cache import PrefixStore, SlotCache
from medassist.batching.rows import Row
from medassist.families import DECODER

if TYPE_CHECKING:
    from medassist.engine import Engine

log = logging.getLogger("medassist.batching")
ATTENTION = ("sdpa", "eager")
PREFILL_TOKENS = 2048  # new prompt tokens admitted into one prefill forward (the first always fits)


def language_model(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay in place), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def batching_problem(model, family) -> str | None:
    """Why ``model`` cannot be decoded by the :class:`Batcher` (None when it can)."""
    if family.name != DECODER:
        return f"{family.name} models decode with transformers' generate"
    lm = language_model(model)
    if not isinstance(lm, torch.nn.Module) or hasattr(lm, "_orig_mod"):
        return "not a plain torch module"
    adapters = getattr(model, "peft_config", None)
    if isinstance(adapters, dict) and any(getattr(c, "is_prompt_learning", False) for c in adapters.values()):
        return "a prompt-learning adapter (its virtual tokens live outside the base model)"
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "no decoder-only config"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ATTENTION:
        return f"attention implementation {impl!r} (the batcher needs one of {', '.join(ATTENTION)})"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "layers other than full attention (sliding-window or linear)"
    if not layer_types and getattr(config, "sliding_window", None) is not None \
            and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return "forward has no signature"
    if not {"cache", "position_ids", "attention_mask"} <= set(params):
        return "forward takes no 'cache' / 'position_ids' argument"
    return None



class Batcher:
    """The rows being decoded together (at most ``max_rows``) and those waiting for a slot.

    Single-threaded: :meth:`step` admits waiting rows (prefilled together), then runs one
    decoding step for every row. Call it under ``torch.inference_mode()``.
    """

    def __init__(self, engine: "Engine", max_rows: int, model=None) -> None:
        self.engine = engine
        self.lm = language_model(model if model is not None else engine.model)
        self.max_rows = max(1, int(max_rows))
        self.tokenizer = engine.tokenizer
        self.stop_ids = set(engine.stop_ids)
        self.pad_id = engine.fmt.pad_id
        self.device = engine.device
        config = self.lm.config
        self.bool_mask = config._attn_implementation == "sdpa"
        self.logits_to_keep = "logits_to_keep" in inspect.signature(self.lm.forward).parameters
        self.layers = getattr(config, "num_hidden_layers", None)
        self.cache = SlotCache()
        self.prefixes = PrefixStore()
        self.active: list[Row] = []  # index = slot
        self.waiting: collections.deque[Row] = collections.deque()
        self.steps = 0

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    # -- one step -------------------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        new = self._admit()
        if new:
            self._prefill(new)
            self._retire()
        if self.active:
            self._decode()
            self._retire()
        self.steps += 1

    def fail_all(self, error: BaseException) -> None:
        """End every row with ``error`` (the batch is reset)."""
        rows = self.active + list(self.waiting)
        self.active, self.waiting = [], collections.deque()
        for row in rows:
            if not row.done:
                row.error = error
                self._end(row)

    # -- admission and prefill ---------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for row in self.active:
            if row.is_cancelled:
                row.was_cancelled = True
                self._end(row)
        if any(r.is_cancelled for r in self.waiting):
            keep = collections.deque()
            for row in self.waiting:
                if row.is_cancelled:
                    row.was_cancelled = True
                    self._end(row)
                else:
                    keep.append(row)
            self.waiting = keep
        self._retire()

    def _admit(self) -> list[Row]:
        new: list[Row] = []
        budget = PREFILL_TOKENS
        while self.waiting and len(self.active) + len(new) < self.max_rows:
            row = self.waiting[0]
            if new and len(row.prompt) > budget:
                break
            budget -= len(row.prompt)
            new.append(self.waiting.popleft())
        if not new:
            return []
        rows = len(self.active) + len(new)
        longest = max(len(r.prompt) + r.settings.max_new_tokens for r in [*self.active, *new])
        self.cache.reserve(rows + 1, longest)  # + 1: a row to compute shared prefixes in
        for i, row in enumerate(new):
            row.slot = len(self.active) + i
        self.active.extend(new)
        return new

    def _prefill(self, rows: list[Row]) -> None:
        prompts = [r.prompt for r in rows]
        for key in self.prefixes.wanted(prompts):
            self._compute_prefix(key)
        self.prefixes.seen(prompts)
        starts = []
        for row in rows:
            key = self.prefixes.best(row.prompt)
            if key:
                self.cache.write(row.slot, self.prefixes.entries[key])
            starts.append(len(key))
        logits = self._run_prompts(rows[0].slot, [r.prompt for r in rows], starts)
        for row in rows:
            row.length = len(row.prompt)
        self._pick(rows, logits)

    def _compute_prefix(self, key: tuple[int, ...]) -> None:
        """Keys and values of the prompt prefix ``key`` (extending the longest stored one)."""
        base = self.prefixes.best(key)
        row = self.cache.rows - 1  # the spare row, beyond every slot
        if base:
            self.cache.write(row, self.prefixes.entries[base])
        self._run_prompts(row, [list(key)], [len(base)])
        self.prefixes.add(key, self.cache.read(row, len(key)))

    def _run_prompts(self, first_slot: int, prompts: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Prefill rows ``first_slot..`` with ``prompts[i][starts[i]:]`` (their cache already
        holds ``starts[i]`` tokens); left-padded, so every row's last token is the last column.
        Returns each row's next-token logits."""
        n = len(prompts)
        width = max(len(p) - s for p, s in zip(prompts, starts))
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        write = torch.full((n, width), self.cache.scratch, dtype=torch.long)
        real = torch.zeros((n, width), dtype=torch.bool)
        for i, (prompt, start) in enumerate(zip(prompts, starts)):
            new = prompt[start:]
            pad = width - len(new)
            ids[i, pad:] = torch.tensor(new, dtype=torch.long)
            positions[i, pad:] = torch.arange(start, len(prompt))
            positions[i, :pad] = start
            write[i, pad:] = positions[i, pad:]
            real[i, pad:] = True
        kv_length = max(len(p) for p in prompts)
        columns = torch.arange(kv_length)
        allowed = columns[None, None, :] <= positions[:, :, None]  # causal, per row
        allowed &= real[:, :, None] | (columns == 0)[None, None, :]  # padding looks at column 0 only
        return self._forward(ids, allowed[:, None], positions, write, first_slot, first_slot + n, kv_length)

    # -- decoding ---------------------------------------------------------------------------
    def _decode(self) -> None:
        rows = self.active
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long)
        kv_length = int(positions.max()) + 1
        allowed = torch.arange(kv_length)[None, :] <= positions  # [rows, keys]
        logits = self._forward(ids, allowed[:, None, None, :], positions, positions, 0, len(rows), kv_length)
        for row in rows:
            row.length += 1
        self._pick(rows, logits)

    def _forward(self, ids, allowed, positions, write, lo: int, hi: int, kv_length: int) -> torch.Tensor:
        device = self.device
        ids, positions, write, allowed = (t.to(device) for t in (ids, positions, write, allowed))
        if self.bool_mask:
            mask = allowed
        else:
            dtype = next(self.lm.parameters()).dtype
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        self.cache.select(lo, hi, write, kv_length)
        kwargs = {"logits_to_keep": 1} if self.logits_to_keep else {}
        out = self.lm(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True,
                      **kwargs)
        if self.cache.calls == 0 or (self.layers and self.cache.calls != self.layers):
            raise RuntimeError(f"the model wrote its keys/values {self.cache.calls} times for "
                               f"{self.layers} layers: it does not use the cache it was given")
        return out.logits[:, -1, :].float()

    def _pick(self, rows: list[Row], logits: torch.Tensor) -> None:
        plain = [i for i, r in enumerate(rows) if r.picker.plain]
        chosen: dict[int, int] = {}
        if len(plain) == len(rows):
            chosen.update(enumerate(logits.argmax(-1).tolist()))
        elif plain:
            chosen.update(zip(plain, logits[plain].argmax(-1).tolist()))
        for i, row in enumerate(rows):
            if i not in chosen:
                chosen[i] = row.picker(logits[i], row.prompt + row.tokens)
        for i, row in enumerate(rows):
            self._append(row, chosen[i])

    def _append(self, row: Row, token: int) -> None:
        row.tokens.append(token)
        if row.on_token is not None:
            row.on_token(token)
        if token in self.stop_ids:
            row.stopped = True
        elif row.settings.stop and self._hit_stop_string(row):
            row.stopped = True
        if row.stopped or len(row.tokens) >= row.settings.max_new_tokens:
            self._end(row)

    def _hit_stop_string(self, row: Row) -> bool:
        stops = [s for s in row.settings.stop if s]
        tail = max(len(s) for s in stops) + 2  # a stop string spans at most one token per character
        text = self.tokenizer.decode(row.tokens[-tail:], skip_special_tokens=True)
        return any(s in text for s in stops)

    def _end(self, row: Row) -> None:
        if row.done:
            return
        row.done = True
        if row.on_done is not None:
            try:
                row.on_done(row)
            except Exception:  # noqa: BLE001 - one caller's failure never stops the others
                log.exception("on_done callback failed")

    def _retire(self) -> None:
        """Drop ended rows; the last rows move into the holes, so the rows stay slots 0..n-1."""
        if not any(r.done for r in self.active):
            return
        keep = [r for r in self.active if not r.done]
        holes = sorted(r.slot for r in self.active if r.done and r.slot < len(keep))
        movers = [r for r in keep if r.slot >= len(keep)]
        for hole, row in zip(holes, movers):
            self.cache.move(row.slot, hole, row.length)
            row.slot = hole
        self.active = sorted(keep, key=lambda r: r.slot)

