"""The continuous batch's key/value storage: one cache slot per row, and the prompt prefixes
that several rows share, computed once (see :mod:`medassist.batching`)."""

from __future__ import annotations

import collections
from typing import Sequence

import torch


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

