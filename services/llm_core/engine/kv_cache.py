"""The KV arena: one preallocated store per replica; each session's KV is one contiguous run of blocks in it.

Why contiguous runs: attention reads a session's keys in place, as a view `k[layer, :, start : start + len]`, so
a decode step costs what its own keys cost, with no copy. (The block pool this replaces gathered every decode
session's KV into a padded tensor per layer per step: 2.0 s steps at 4096 tokens of context against 0.18 s at
256, 16 sessions, small config.) Fixed slots sized for the longest session would be contiguous too, but would hold
every session at that size, short chats included; a run is sized per session instead:
- a new session gets the blocks its `Reservation` promises (LLMCore promises a live session its whole token limit,
  so it never moves and its growth never fails; a chat its prompt and longest answer), or the blocks its first
  rows need;
- growing, it extends in place when the blocks right after it are free; else it moves (one copy of its rows) to a
  free run of twice its size, so a session of n rows has been copied O(n) rows in all (in a crowded arena, with
  less than a quarter free, to a run of just the size it needs); else, when the free blocks are enough but
  scattered, the arena is compacted (runs slide down in order, one copy each; rare);
- with too few free blocks the scheduler evicts idle sessions (LRU) or fails the request (`EngineFullError`);
- a session's KV rebuilt beside it (a context roll) replaces it by a copy of its rows into the session's own run, so
  the session keeps what it was promised.

`KVAllocator` is the bookkeeping (pure Python: runs, committed lengths, LRU clock); it records the copies and
zeroings it decides as `Move`/`Zero` ops, which `KVArena` (the tensors) applies on the engine thread before the
next forward. Rows count (are committed) only after the forward that wrote them finished, so a step whose result is
thrown away (interrupt) leaves the session unchanged.

Isolation: attention reads only a session's own committed rows. A kernel that reads whole blocks (the CUDA flex
kernel multiplies a masked position's value by 0, which NaN survives) must also never find another session's rows
in a block it reads: runs are block-aligned, free blocks are zero (freed and vacated blocks are zeroed, and so is
the part of a run past its rows when compaction slides it over old rows), so past its own length a session's
blocks hold zeros or rows of its own (a discarded step's, or its KV before a context roll replaced it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.runtime.errors import ReplicaFull, ResourceExhausted


class EngineFullError(ResourceExhausted, RuntimeError):
    """The KV arena has no room for this work (RESOURCE_EXHAUSTED; retry later or on another replica)."""


class SessionRefused(EngineFullError, ReplicaFull):
    """The arena cannot promise a new session its room: another replica may have it."""


@dataclass(frozen=True)
class Move:
    src: int  # token rows [src, src + n) of every layer go to [dst, dst + n)
    dst: int
    n: int


@dataclass(frozen=True)
class Zero:
    start: int  # token rows [start, start + n) of every layer become 0
    n: int


KVOp = Move | Zero


@dataclass(frozen=True)
class Reservation:
    """What a new session is promised: `tokens` rows held for it from its creation (its growth up to them never
    waits for, or fails on, anyone else's). With a `headroom`, the session is admitted only if the runs promised to
    every session admitted so (itself included) leave `headroom` rows of the arena unpromised: room kept for work
    without such a promise, such as building a context roll beside a session, which may hold it meanwhile."""

    tokens: int = 0
    headroom: int = 0


NO_RESERVATION = Reservation()


@dataclass
class SessionKV:
    start: int = 0  # first block of the run
    blocks: int = 0  # blocks held
    num_tokens: int = 0  # committed KV rows
    last_used: int = 0  # LRU clock value of the last time work was scheduled for the session
    last_used_s: float = 0.0  # the allocator's clock (seconds) at that time
    admitted: bool = False  # created with a headroom: its run counts as promised


class KVAllocator:
    """Which run of arena blocks belongs to which session, and how many of its rows are valid."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_session_tokens: int | None = None,
        seconds: Callable[[], float] = time.monotonic,
    ):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"KV arena needs num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_session_blocks = self._blocks_for(max_session_tokens) if max_session_tokens else num_blocks
        self._sessions: dict[str, SessionKV] = {}
        self._ops: list[KVOp] = []
        self._clock = 0
        self._seconds = seconds
        self.moves = 0  # sessions moved (relocations and compaction slides)

    # --- queries ----------------------------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return self.num_blocks - sum(s.blocks for s in self._sessions.values())

    @property
    def used_tokens(self) -> int:
        return sum(s.num_tokens for s in self._sessions.values())

    @property
    def promised_tokens(self) -> int:
        """KV room promised to admitted sessions (a roll's KV beside its session is not a promise)."""
        return self._promised_blocks() * self.block_size

    def has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def num_tokens(self, session_id: str) -> int:
        return self._sessions[session_id].num_tokens

    def offset(self, session_id: str) -> int:
        """Arena row of the session's KV position 0."""
        return self._sessions[session_id].start * self.block_size

    def run(self, session_id: str) -> tuple[int, int]:
        """(first block, blocks) of the session's run."""
        s = self._sessions[session_id]
        return s.start, s.blocks

    def blocks_needed(self, session_id: str, n_new: int) -> int:
        """Free blocks the session must gain to hold `n_new` more rows (an unknown session id counts as empty)."""
        s = self._sessions.get(session_id)
        return max(0, self._blocks_for((s.num_tokens if s else 0) + n_new) - (s.blocks if s else 0))

    def lru_order(self) -> list[str]:
        """Session ids, least recently used first."""
        return sorted(self._sessions, key=lambda sid: self._sessions[sid].last_used)

    def idle_s(self, session_id: str) -> float:
        """Seconds since work was last scheduled for the session."""
        return self._seconds() - self._sessions[session_id].last_used_s

    def pop_ops(self) -> list[KVOp]:
        """The copies and zeroings decided since the last call, in the order they must be applied."""
        ops, self._ops = self._ops, []
        return ops

    # --- changes ----------------------------------------------------------------------------------------------

    def can_create(self, reservation: Reservation) -> bool:
        """The arena can promise a new session this reservation now (see `Reservation`)."""
        blocks = self._blocks_for(reservation.tokens)
        promised = self._promised_blocks() + blocks + self._blocks_for(reservation.headroom)
        return blocks <= self.free_blocks and (not reservation.headroom or promised <= self.num_blocks)

    def create(self, session_id: str, reservation: Reservation = NO_RESERVATION) -> None:
        """A new session, holding the run its reservation promises (all-or-nothing)."""
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} already has KV")
        if not self.can_create(reservation):
            kept = f" and {reservation.headroom} more kept free (room for context rolls)" if reservation.headroom else ""
            admitted = sum(s.admitted for s in self._sessions.values())
            raise SessionRefused(
                f"KV arena full: a new session is promised {reservation.tokens} tokens{kept}; "
                f"{self._promised_blocks() * self.block_size} of {self.capacity_tokens} tokens are promised to "
                f"{admitted} sessions, {self.free_blocks * self.block_size} free now. Retry later or on another "
                f"replica; more sessions per replica need a larger kv_budget_tokens"
            )
        blocks = self._blocks_for(reservation.tokens)
        s = self._sessions[session_id] = SessionKV(last_used=self._tick(), last_used_s=self._seconds(),
                                                   admitted=reservation.headroom > 0)  # fmt: skip
        if blocks:
            start = self._find_run(blocks)
            if start is None:
                self._compact(s, blocks)  # enough free blocks, but scattered: the new run goes after all others
            else:
                s.start = start
            s.blocks = blocks

    def reserve(self, session_id: str, n_new: int) -> None:
        """Make room for `n_new` more rows of an existing session; all-or-nothing."""
        s = self._sessions[session_id]
        grow = self.blocks_needed(session_id, n_new)
        free = self.free_blocks
        if grow > free:
            raise EngineFullError(
                f"KV arena full: session {session_id!r} needs {grow} more blocks of {self.block_size} tokens, "
                f"{free} of {self.num_blocks} free"
            )
        self.touch(session_id)
        if grow == 0:
            return
        need = s.blocks + grow
        if s.blocks and self._free_after(s) >= grow:
            s.blocks = need  # extend in place
            return
        roomy = max(need, min(2 * s.blocks, self.max_session_blocks))  # room to grow before the next move
        if free - (roomy - s.blocks) < self.num_blocks // 4:
            roomy = need  # a crowded arena: spare blocks held by one session would push others out
        for blocks in dict.fromkeys((roomy, need)):
            start = self._find_run(blocks)
            if start is not None:
                self._relocate(s, start, blocks)
                return
        self._compact(s, grow)  # enough free blocks, but scattered
        s.blocks = need

    def commit(self, session_id: str, n: int) -> None:
        """Count `n` more rows as valid (after the forward that wrote them)."""
        s = self._sessions[session_id]
        if s.num_tokens + n > s.blocks * self.block_size:
            raise AssertionError(f"commit of {n} rows beyond the reserved blocks of {session_id!r}")
        s.num_tokens += n

    def touch(self, session_id: str) -> None:
        s = self._sessions[session_id]
        s.last_used, s.last_used_s = self._tick(), self._seconds()

    def free(self, session_id: str) -> int:
        """Give a session's run back (zeroed); returns its block count. Unknown ids are a no-op."""
        s = self._sessions.pop(session_id, None)
        if s is None:
            return 0
        self._zero_blocks(s.start, s.blocks)
        return s.blocks

    def rename(self, source_id: str, target_id: str) -> None:
        """`source_id`'s rows become `target_id`'s KV, and `source_id` is gone. A target whose run can hold them
        keeps its run, and so what it was promised: the rows are copied in (one copy of the rows, far less than the
        forward that built them). Otherwise the target's run is freed and it takes the source's run."""
        s = self._sessions.pop(source_id)
        t = self._sessions.get(target_id)
        if t is None or t.blocks * self.block_size < s.num_tokens:
            self.free(target_id)
            s.admitted = s.admitted or (t is not None and t.admitted)
            self._sessions[target_id] = s
            return
        if s.num_tokens:  # two runs never overlap; rows of t past its new length are its own old rows
            self._ops.append(Move(s.start * self.block_size, t.start * self.block_size, s.num_tokens))
            self.moves += 1
        self._zero_blocks(s.start, s.blocks)
        t.num_tokens = s.num_tokens
        self.touch(target_id)

    # --- internals --------------------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _promised_blocks(self) -> int:
        return sum(s.blocks for s in self._sessions.values() if s.admitted)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _runs(self) -> list[SessionKV]:
        return sorted((s for s in self._sessions.values() if s.blocks), key=lambda s: s.start)

    def _end_of_runs(self) -> int:
        return max((s.start + s.blocks for s in self._sessions.values() if s.blocks), default=0)

    def _free_after(self, s: SessionKV) -> int:
        end = s.start + s.blocks
        nxt = min((o.start for o in self._sessions.values() if o.blocks and o.start >= end and o is not s),
                  default=self.num_blocks)  # fmt: skip
        return nxt - end

    def _find_run(self, blocks: int) -> int | None:
        """First block of the first free run of at least `blocks` blocks, or None."""
        pos = 0
        for o in self._runs():
            if o.start - pos >= blocks:
                return pos
            pos = o.start + o.blocks
        return pos if self.num_blocks - pos >= blocks else None

    def _relocate(self, s: SessionKV, start: int, blocks: int) -> None:
        if s.num_tokens:
            self._ops.append(Move(s.start * self.block_size, start * self.block_size, s.num_tokens))
            self.moves += 1
        self._zero_blocks(s.start, s.blocks)
        s.start, s.blocks = start, blocks

    def _compact(self, grower: SessionKV, grow: int) -> None:
        """Slide every run down, in order, leaving `grow` free blocks right after `grower` (after all runs if it has
        none yet). Moves are ordered so that none overwrites rows another still has to read: those going down in
        ascending order, then those going up (the runs after the gap) in descending order."""
        old = [(s, s.start) for s in self._runs()]
        pos = 0
        for s, _ in old:
            s.start = pos
            pos += s.blocks + (grow if s is grower else 0)
        if not grower.blocks:
            grower.start = pos
        moved = [(s, start) for s, start in old if s.start != start]
        down = [(s, start) for s, start in moved if s.start < start]
        up = [(s, start) for s, start in reversed(moved) if s.start > start]
        bs = self.block_size
        for s, start in [*down, *up]:
            if s.num_tokens:
                self._ops.append(Move(start * bs, s.start * bs, s.num_tokens))
                self.moves += 1
        # what moved left stale rows behind: in blocks no run holds now, and in the moved runs past their rows
        held = [False] * self.num_blocks
        for s, _ in old:
            held[s.start : s.start + s.blocks] = [True] * s.blocks
        for s, start in old:
            self._zero_blocks_where(start, s.blocks, held)
        for s, _ in moved:
            rows = s.blocks * bs - s.num_tokens
            if rows:
                self._ops.append(Zero(s.start * bs + s.num_tokens, rows))

    def _zero_blocks_where(self, start: int, blocks: int, held: list[bool]) -> None:
        """Zero the blocks of [start, start + blocks) that no run holds, in maximal pieces."""
        b = start
        while b < start + blocks:
            if held[b]:
                b += 1
                continue
            end = b
            while end < start + blocks and not held[end]:
                end += 1
            self._zero_blocks(b, end - b)
            b = end

    def _zero_blocks(self, start: int, blocks: int) -> None:
        if blocks > 0:
            self._ops.append(Zero(start * self.block_size, blocks * self.block_size))


class KVArena:
    """The K and V rows of every layer: (layers, kv_heads, rows, head_dim), the layout attention reads in place.

    `rows` = the allocator's blocks plus one scratch block at the end that no session owns: rows a CUDA graph
    pads a batch with write there.
    """

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
        shape = (num_layers, num_kv_heads, (num_blocks + 1) * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scratch_row = num_blocks * block_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def apply(self, ops: list[KVOp]) -> None:
        for op in ops:
            for t in (self.k, self.v):
                if isinstance(op, Zero):
                    t[:, :, op.start : op.start + op.n].zero_()
                else:
                    src = t[:, :, op.src : op.src + op.n]
                    overlap = op.dst < op.src + op.n and op.src < op.dst + op.n
                    t[:, :, op.dst : op.dst + op.n] = src.clone() if overlap else src

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (N, kv_heads, head_dim) at arena rows (N,)."""
        self.k[layer].index_copy_(1, rows, k.transpose(0, 1))
        self.v[layer].index_copy_(1, rows, v.transpose(0, 1))

    def keys(self, layer: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of K, V rows [start, start + n) of `layer`: (kv_heads, n, head_dim) each."""
        return self.k[layer, :, start : start + n], self.v[layer, :, start : start + n]
