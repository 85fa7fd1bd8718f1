"""Continuous batching: every answer being generated shares each forward pass.

Answers join the batch between decoding steps and leave it the step they end (EOS, a stop
string, ``max_new_tokens``, or a cancel), so no row waits for the longest answer and no
finished row is computed again. The same :class:`Batcher` serves the batch API
(:meth:`Engine.generate <medassist.engine.Engine.generate>`, evaluation: prompts are fed in
as rows free up) and the server (:class:`BatchScheduler`, a thread that takes requests as
they arrive and streams each one's tokens).

**Why not transformers' own continuous batching** (``generate_batch`` /
``init_continuous_batching``, tried first, transformers 5.24, torch 2.13 CPU, fp32, SmolLM2-135M
and a LoRA-wrapped model): it runs on CPU, with a PEFT model too, and its greedy answers equal
unbatched ones, but it does not do what is needed here (measured on 1 thread of the shared
2-core VM):

- on CPU its attention (``sdpa`` over its paged cache) puts every request of a step in one
  flattened sequence with a dense ``[sum of queries x sum of keys]`` mask, so attention work
  grows with the square of the batch: 48 MedQuAD prompts x 24 tokens took 19.3 s against
  11.5 s for plain ``generate`` with one batch of 48 (16 prompts: 9.8 s vs 10.1 s, no gain);
- ``do_sample`` and the seed belong to the manager, not the request (greedy and sampled
  requests cannot share a batch; per-request seeds do not exist); stop strings are not
  supported and ``repetition_penalty`` is dropped with a warning;
- its prefix sharing only reuses whole pages that an earlier forward completed, so requests
  that arrive together (an evaluation) share nothing;
- encoder-decoder models are not supported at all.

**How it works.** Each row (sequence) owns one slot of a preallocated key/value cache
(:class:`SlotCache`, ``[rows, kv heads, positions, head dim]`` per layer), its tokens from
column 0, so rows of any length sit side by side and a row that leaves frees its slot without
touching the others (the last row moves into the hole). A decoding step feeds one token per
row with its own position id and a ``[rows, 1, 1, keys]`` mask; new rows are prefilled
together, left-padded so each one's last prompt token is the last column. The cache is handed
to the transformers model as its ``cache`` argument (the model writes each layer's new keys
and values through :meth:`SlotCache.update`), so the model code itself is unchanged.
Prompt prefixes shared with other prompts (the system prompt, a conversation's earlier
turns, MedQuAD's question templates) are computed once and copied into each row
(:class:`PrefixStore`): a prompt is prefilled only from where it differs. On the evaluation
workload (64 MedQuAD prompts x 64 greedy tokens, SmolLM2 fp32, 1 thread of the shared VM):
``generate`` in batches of 16 took 45.2 s, this batcher 38.6 s with 16 rows and 21.0 s with 64,
answers identical (64/64). Decoding a few rows is bound by reading every weight once per
step, so rows are what pays.

The stop rule and the sampling rule are the engine's: the engine's stop ids and stop
strings, and, per row, transformers' own logits processors in ``generate``'s order
(repetition penalty, no-repeat n-grams; with sampling, temperature, top-k, top-p, min-p).
Greedy rows take the argmax of the fp32 logits, as ``generate`` does; greedy answers equal
unbatched ones (tests/test_batching.py). Each row samples with its own generator when it has
a seed, so a seeded answer does not depend on what else is in the batch.

Models the batcher does not take (:func:`batching_problem`): encoder-decoder models (their
decoder cross-attends to per-row encoder states, which this cache does not hold: they keep
transformers' batched ``generate``), attention other than ``sdpa``/``eager``, sliding-window
layers, and anything that is not a plain torch module (test stubs that only offer
``generate``).
"""

from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from medassist.config import GenerationSettings
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


# ---------------------------------------------------------------------------------------
# the cache
class SlotCache:
    """Keys and values of every row, each row in its own slot, its tokens from column 0.

    Per layer one ``[rows, kv heads, length, head dim]`` tensor for keys and one for values,
    allocated on the first write (the model's shapes and dtype), grown when a longer row or
    more rows come. The last column is scratch: prompt padding writes there and no mask ever
    lets a query see it. Before each forward :meth:`select` says which rows run (a contiguous
    range), where each new token goes and how many columns attention reads.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.rows = self.length = 0
        self.calls = 0
        self._lo = self._hi = self._kv = 0
        self._rows_index: torch.Tensor | None = None
        self._write: torch.Tensor | None = None

    @property
    def scratch(self) -> int:
        return self.length - 1

    def reserve(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` tokens (plus the scratch column)."""
        rows = max(rows, self.rows)
        length = max(length + 1, self.length)
        if (rows, length) == (self.rows, self.length):
            return
        if length > self.length and self.length:
            length = max(length, self.length + self.length // 2)  # grow by half at least: few copies
        length = -(-length // 64) * 64
        for store in (self.keys, self.values):
            for layer, old in store.items():
                new = old.new_zeros((rows, old.shape[1], length, old.shape[3]))
                new[: self.rows, :, : self.length - 1] = old[:, :, : self.length - 1]
                store[layer] = new
        self.rows, self.length = rows, length

    def select(self, lo: int, hi: int, write: torch.Tensor, kv_length: int) -> None:
        """The next forward runs rows ``lo..hi-1``; token ``t`` of row ``r`` goes to column
        ``write[r, t]``; attention reads columns ``0..kv_length-1``."""
        self._lo, self._hi, self._kv = lo, hi, kv_length
        self._rows_index = torch.arange(lo, hi, device=write.device)[:, None]
        self._write = write
        self.calls = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the model's attention layers call: store the new keys/values, return all of the rows'."""
        if layer_idx not in self.keys:
            _, heads, _, dim = key_states.shape
            self.keys[layer_idx] = key_states.new_zeros((self.rows, heads, self.length, dim))
            self.values[layer_idx] = value_states.new_zeros((self.rows, heads, self.length, value_states.shape[3]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._rows_index, :, self._write] = key_states.transpose(1, 2).to(keys.dtype)
        values[self._rows_index, :, self._write] = value_states.transpose(1, 2).to(values.dtype)
        self.calls += 1
        return keys[self._lo : self._hi, :, : self._kv], values[self._lo : self._hi, :, : self._kv]

    def move(self, src: int, dst: int, length: int) -> None:
        for store in (self.keys, self.values):
            for tensor in store.values():
                tensor[dst, :, :length] = tensor[src, :, :length]

    def read(self, row: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.keys[i][row, :, :length].clone(), self.values[i][row, :, :length].clone())
                for i in sorted(self.keys)]

    def write(self, row: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (k, v) in zip(sorted(self.keys), kv):
            self.keys[i][row, :, : k.shape[1]] = k
            self.values[i][row, :, : v.shape[1]] = v

    # what else transformers may ask of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------
# shared prompt prefixes
def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixStore:
    """Keys and values of prompt prefixes that several prompts share, computed once.

    A prefix is worth keeping when at least ``min_tokens`` tokens are shared with other
    prompts admitted with it or seen recently, and computing it once saves at least
    ``min_saving`` prompt tokens. Entries are kept least-recently-used.
    """

    def __init__(self, max_entries: int = 32, min_tokens: int = 16, min_saving: int = 48, recent: int = 16) -> None:
        self.entries: collections.OrderedDict[tuple[int, ...], list] = collections.OrderedDict()
        self.max_entries, self.min_tokens, self.min_saving = max_entries, min_tokens, min_saving
        self.recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=recent)

    def best(self, prompt: Sequence[int]) -> tuple[int, ...]:
        """The longest stored prefix of ``prompt`` that leaves at least one token ("" if none)."""
        best: tuple[int, ...] = ()
        for key in self.entries:
            if len(best) < len(key) < len(prompt) and tuple(prompt[: len(key)]) == key:
                best = key
        if best:
            self.entries.move_to_end(best)
        return best

    def wanted(self, prompts: Sequence[Sequence[int]], limit: int = 8) -> list[tuple[int, ...]]:
        """Prefixes worth computing for ``prompts``, shortest first: each prompt's longest common
        prefix with another of them or with a recent prompt, kept where computing it once saves
        at least ``min_saving`` prompt tokens over what is stored (each prefix is computed by
        extending the longest stored or chosen one)."""
        mine = {tuple(p) for p in prompts}
        pool = sorted(mine | set(self.recent))  # a prompt's longest common prefix is with a neighbour
        candidates: set[tuple[int, ...]] = set()
        for prompt in mine:
            at = pool.index(prompt)
            shared = max((_common(prompt, pool[j]) for j in (at - 1, at + 1) if 0 <= j < len(pool)), default=0)
            shared = min(shared, len(prompt) - 1)
            if shared >= self.min_tokens:
                candidates.add(prompt[:shared])
        chosen: list[tuple[int, ...]] = []
        for key in sorted(candidates, key=len):
            if key in self.entries:
                continue
            base = max([len(k) for k in [*self.entries, *chosen] if len(k) < len(key) and key[: len(k)] == k],
                       default=0)
            users = sum(1 for p in pool if len(p) > len(key) and p[: len(key)] == key)
            # computing it is one more forward (itself ~ one user's worth of tokens, plus reading
            # every weight once): keep it where the others save more than that
            if (users - 2) * (len(key) - base) >= self.min_saving:
                chosen.append(key)
        return chosen[:limit]

    def add(self, key: tuple[int, ...], kv: list) -> None:
        self.entries[key] = kv
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def seen(self, prompts: Sequence[Sequence[int]]) -> None:
        self.recent.extend(tuple(p) for p in prompts)


# ---------------------------------------------------------------------------------------
# rows
class Picker:
    """The next token of one row: transformers' logits processors for its settings, in
    ``generate``'s order, then argmax (greedy) or a draw (with the row's own generator when
    it has a seed)."""

    def __init__(self, config, seed: int | None = None, device: torch.device | None = None) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList, MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
        )

        self.sample = bool(config.do_sample)
        processors = LogitsProcessorList()
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if config.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
        if self.sample:
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=config.top_p))
            if getattr(config, "min_p", None) is not None:
                processors.append(MinPLogitsWarper(min_p=config.min_p))
        self.processors = processors
        self.plain = not self.sample and not processors  # argmax of the raw logits: batched
        self.generator = None
        if self.sample and seed is not None:
            self.generator = torch.Generator(device=device or "cpu")
            self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        scores = logits[None]
        if self.processors:
            ids = torch.tensor([history], device=logits.device)
            scores = self.processors(ids, scores)
        if not self.sample:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(eq=False)
class Row:
    """One answer being generated. ``on_token(id)`` after each new token, ``on_done(row)``
    once, when it ends (``error`` set if generation failed)."""

    prompt: list[int]
    settings: GenerationSettings
    picker: Picker
    on_token: Callable[[int], None] | None = None
    on_done: Callable[["Row"], None] | None = None
    cancelled: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended by a stop id or a stop string
    was_cancelled: bool = False
    done: bool = False
    error: BaseException | None = None
    slot: int = -1
    length: int = 0  # tokens in the cache

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()


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


# ---------------------------------------------------------------------------------------
# the server's side: a thread that batches requests as they come
class BatchScheduler:
    """Runs a :class:`Batcher` in a daemon thread; :meth:`submit` adds rows from any thread.

    Rows join at the next step; a cancelled row leaves at the next step. A failing forward
    ends the rows of that batch with the error and the thread carries on.
    """

    def __init__(self, engine: "Engine", max_rows: int, gather_s: float = 0.015) -> None:
        self.batcher = Batcher(engine, max_rows)
        self.gather_s = gather_s  # an idle batcher waits this long for requests arriving together
        self._incoming: list[Row] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def max_rows(self) -> int:
        return self.batcher.max_rows

    def submit(self, row: Row) -> None:
        with self._wake:
            self._incoming.append(row)
            self._closed = False
            if self._thread is None:  # (again, after close())
                self._thread = threading.Thread(target=self._loop, name="medassist-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()

    def wake(self) -> None:
        """Look at cancellations now (a waiting thread would otherwise see them at the next request)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        """Let the thread end once its rows are done (a later :meth:`submit` starts a new one)."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _loop(self) -> None:
        batcher = self.batcher
        with torch.inference_mode():
            while True:
                with self._wake:
                    idle = not batcher.busy
                    while not self._incoming and not batcher.busy and not self._closed:
                        self._wake.wait()
                    if self._closed and not self._incoming and not batcher.busy:
                        self._thread = None
                        return
                    if idle and self.gather_s:  # clients that send together share the first prefill
                        deadline = time.monotonic() + self.gather_s
                        while len(self._incoming) < batcher.max_rows and not self._closed \
                                and (left := deadline - time.monotonic()) > 0:
                            self._wake.wait(left)
                    for row in self._incoming:
                        batcher.add(row)
                    self._incoming = []
                try:
                    batcher.step()
                except Exception as exc:  # noqa: BLE001 - reported to the rows, never kills the server
                    log.exception("batched generation failed")
                    batcher.fail_all(exc)


def make_row(engine: "Engine", prompt_ids: Sequence[int], settings: GenerationSettings, *, seed: int | None = None,
             on_token: Callable[[int], None] | None = None, on_done: Callable[[Row], None] | None = None,
             cancelled: threading.Event | None = None) -> Row:
    config = engine.generation_config(settings)
    return Row(list(prompt_ids), settings, Picker(config, seed, engine.device), on_token, on_done, cancelled)


def generate_rows(engine: "Engine", prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                  progress: Callable[[int], None] | None = None, model=None) -> list[Row]:
    """The batch API's path: every prompt through one :class:`Batcher` of ``settings.batch_size``
    rows, fed as rows free up; rows in input order."""
    seeded = settings.do_sample and settings.seed is not None
    done: list[Row] = []

    def finished(row: Row) -> None:
        done.append(row)
        if progress is not None:
            progress(1)

    batcher = Batcher(engine, settings.batch_size, model)
    rows = [make_row(engine, p, settings, seed=settings.seed + i if seeded else None, on_done=finished)
            for i, p in enumerate(prompts)]
    for row in rows:
        batcher.add(row)
    with torch.inference_mode():
        while batcher.busy:
            batcher.step()
    return rows


__all__ = ["Batcher", "BatchScheduler", "PrefixStore", "Picker", "Row", "SlotCache", "batching_problem",
           "generate_rows", "language_model", "make_row"]
