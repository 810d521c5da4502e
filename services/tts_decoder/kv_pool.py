"""Fixed KV slots for the speech decoder's utterance segments, as Moshi keeps one batch of streams.

One allocation per decoder: per layer, K and V of shape (slots, heads, capacity, head_dim). A segment takes the
lowest free slot at its start (zeroed: upstream's KV starts as zeros, and condition slots not prefilled yet must read
as zeros) and gives it back at its end. A forward runs over a contiguous span of slots as a view of the pool, so no
KV is ever stacked or copied; span rows that do not advance in that forward are computed but never written, and
their outputs are dropped. Attention is per row, so what a free or idle slot holds cannot reach another row.
"""

from __future__ import annotations

import heapq
import threading

import torch

from services.runtime.errors import ResourceExhausted


class KVPoolFullError(ResourceExhausted):
    """Every speech slot of the replica holds an utterance."""


class KVPool:
    def __init__(self, layers: int, heads: int, head_dim: int, capacity: int, slots: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (slots, heads, capacity, head_dim)
        # `empty`: pages of slots never taken are never touched (on CPU they cost no memory); `acquire` zeroes.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.slots = slots
        self._free = list(range(slots))  # a heap: the lowest free slot first keeps the busy ones together
        self._lock = threading.Lock()  # utterances may start on another thread than the one that steps them

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise KVPoolFullError(f"all {self.slots} speech slots of this replica are in use; retry later")
            slot = heapq.heappop(self._free)
        self.clear(slot)
        return slot

    def clear(self, slot: int) -> None:
        """Upstream's zero KV, for a new segment in `slot`."""
        for k, v in zip(self.keys, self.values):
            k[slot].zero_()
            v[slot].zero_()

    def release(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)

    def span(self, lo: int, hi: int, positions: torch.Tensor, kv_len: int,
             written: torch.Tensor | None = None) -> SlotSpan:
        """Slots lo..hi-1 as LlamaModel's cache for one forward (see `SlotSpan`)."""
        return SlotSpan(self, lo, hi, positions, kv_len, written)


class SlotSpan:
    """Pool slots lo..hi-1 as the KV of one forward over hi-lo rows (gpt-fast style static cache).

    Each layer calls `update`: the new keys of the entries marked `written` (B, q; None: all) go to their rows at
    `positions` (B, q), and the first `kv_len` slots of every row come back for attention (the 4D mask decides
    what each query sees).
    """

    def __init__(self, pool: KVPool, lo: int, hi: int, positions: torch.Tensor, kv_len: int,
                 written: torch.Tensor | None):
        if kv_len > pool.capacity:
            raise RuntimeError(f"KV slot of {pool.capacity} positions cannot hold {kv_len}")
        self.keys = [k[lo:hi] for k in pool.keys]
        self.values = [v[lo:hi] for v in pool.values]
        self.kv_len = kv_len
        heads, capacity = pool.keys[0].shape[1], pool.capacity
        # Found once per forward (no host sync per layer): which of the B*q new entries are kept, and the rows of
        # the span's (B*heads*capacity, head_dim) view their heads go to.
        self._kept = None if written is None else written.flatten().nonzero()[:, 0]
        rows = torch.arange(hi - lo, device=positions.device)[:, None].expand_as(positions).flatten()
        pos = positions.flatten()
        if self._kept is not None:
            rows, pos = rows[self._kept], pos[self._kept]
        head = torch.arange(heads, device=positions.device)
        self._index = ((rows[:, None] * heads + head) * capacity + pos[:, None]).flatten()

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, heads, q, head_dim) new keys and values -> this layer's (B, heads, kv_len, head_dim) ones."""
        k, v = self.keys[layer], self.values[layer]
        for cache, new in ((k, keys), (v, values)):
            new = new.transpose(1, 2).flatten(0, 1)  # (B*q, heads, head_dim)
            if self._kept is not None:
                new = new[self._kept]
            cache.view(-1, cache.shape[-1]).index_copy_(0, self._index, new.flatten(0, 1).to(cache.dtype))
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]
