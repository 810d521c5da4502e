"""Pooled KV cache: one preallocated store per replica, handed out to sessions in fixed-size blocks.

`BlockManager` is the bookkeeping (pure Python: free list, per-session block tables, committed lengths, LRU
clock); `KVPool` holds the tensors. The split keeps the allocation policy unit-testable without a model, the
way nano-vllm separates its block manager from its model runner.

A session's KV rows live in its blocks in order: token t of the session sits in pool slot
`blocks[t // block_size] * block_size + t % block_size`. Rows are only counted (committed) after the forward pass
that wrote them finished, so a step whose result is thrown away (interrupt) leaves the session unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class EngineFullError(RuntimeError):
    """The KV pool has no room for this work (maps to RESOURCE_EXHAUSTED; retry later or on another replica)."""


@dataclass
class SessionBlocks:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # committed KV rows
    last_used: int = 0  # LRU clock value of the last time work was scheduled for the session


class BlockManager:
    """Which pool blocks belong to which session, and how many of their rows are valid."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV pool needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._sessions: dict[str, SessionBlocks] = {}
        self._clock = 0

    # --- queries ----------------------------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_tokens(self) -> int:
        return sum(s.num_tokens for s in self._sessions.values())

    def has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def num_tokens(self, session_id: str) -> int:
        return self._sessions[session_id].num_tokens

    def blocks(self, session_id: str) -> list[int]:
        return self._sessions[session_id].blocks

    def blocks_needed(self, session_id: str, n_new: int) -> int:
        """Blocks still to allocate so that the session can hold `n_new` more rows (0 for a new session id too)."""
        s = self._sessions.get(session_id)
        have = len(s.blocks) if s else 0
        used = s.num_tokens if s else 0
        return max(0, -(-(used + n_new) // self.block_size) - have)

    def lru_order(self) -> list[str]:
        """Session ids, least recently used first."""
        return sorted(self._sessions, key=lambda sid: self._sessions[sid].last_used)

    # --- changes ----------------------------------------------------------------------------------------------

    def create(self, session_id: str) -> None:
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} already has KV")
        self._sessions[session_id] = SessionBlocks(last_used=self._tick())

    def reserve(self, session_id: str, n_new: int) -> None:
        """Make room for `n_new` more rows of an existing session; all-or-nothing."""
        need = self.blocks_needed(session_id, n_new)
        if need > len(self._free):
            raise EngineFullError(
                f"KV pool full: session {session_id!r} needs {need} more blocks of {self.block_size} tokens, "
                f"{len(self._free)} of {self.num_blocks} free"
            )
        s = self._sessions[session_id]
        s.blocks.extend(self._free.pop() for _ in range(need))
        s.last_used = self._tick()

    def commit(self, session_id: str, n: int) -> None:
        """Count `n` more rows as valid (after the forward that wrote them)."""
        s = self._sessions[session_id]
        if s.num_tokens + n > len(s.blocks) * self.block_size:
            raise AssertionError(f"commit of {n} rows beyond the reserved blocks of {session_id!r}")
        s.num_tokens += n

    def touch(self, session_id: str) -> None:
        self._sessions[session_id].last_used = self._tick()

    def free(self, session_id: str) -> int:
        """Give all blocks of a session back; returns how many. Unknown ids are a no-op."""
        s = self._sessions.pop(session_id, None)
        if s is None:
            return 0
        self._free.extend(reversed(s.blocks))
        return len(s.blocks)

    def slots(self, session_id: str, start: int, n: int) -> list[int]:
        """Pool slot indices of rows [start, start + n) of a session (must be reserved)."""
        s = self._sessions[session_id]
        bs = self.block_size
        return [s.blocks[t // bs] * bs + t % bs for t in range(start, start + n)]

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


class KVPool:
    """The preallocated K and V tensors of every layer: (layers, num_blocks * block_size, kv_heads, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rows k, v (N, kv_heads, head_dim) at pool slots (N,)."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def read(self, layer: int, slot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at slot_index (B, L) as (B, kv_heads, L, head_dim), the layout SDPA takes.

        A gather copy per layer: plain PyTorch has no paged-attention kernel on CPU, and the copy is small next to
        the projections at our batch sizes.
        """
        k = self.k[layer][slot_index]  # (B, L, Hkv, Dh)
        v = self.v[layer][slot_index]
        return k.transpose(1, 2), v.transpose(1, 2)
