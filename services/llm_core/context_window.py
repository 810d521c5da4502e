"""The rolling context of a live session: what its KV keeps when it grows past its window.

A live session may last for hours, but its KV cannot grow without bound. When it reaches `window_tokens` (the
high-water mark), LLMCore rebuilds it from a subset of its replay log of at most `keep_tokens` (the low-water
mark), chosen here:

- the system prompt (with its reference voice) is always kept;
- the text of every turn is kept: what the user typed, each answer (its assistant prefix and the ids fed back),
  and the markup that opens and closes the turns;
- the most recent 1 s units are kept, newest first, as many as fit in what is left of `keep_tokens`; older
  units are dropped (a dropped unit that opened its turn leaves its turn-opening markup behind);
- when the text alone does not fit, the oldest turns are dropped whole (never the one in progress), and the
  first turn left after the system prompt loses the markup that closed the dropped answer before it.

The result is a new log, exactly the prefills a fresh session would get for that content, in order: the KV
rebuilt from it equals a fresh session prefilled with it (positions start from 0 again). Pure logic on replay
entries (their kinds, markup counts and token counts): no model, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protos.minicpmo.v1 import llm_pb2, replay_pb2
from services.common.tensor_codec import from_proto, to_proto

SYSTEM, UNIT, TEXT = llm_pb2.PREFILL_KIND_SYSTEM, llm_pb2.PREFILL_KIND_UNIT, llm_pb2.PREFILL_KIND_TEXT


@dataclass(frozen=True)
class WindowPolicy:
    window_tokens: int  # a session whose KV reaches this is rolled
    keep_tokens: int  # what the rolled KV may hold at most (the system prompt and the turns' text always stay)

    def __post_init__(self) -> None:
        if not 0 < self.keep_tokens < self.window_tokens:
            raise ValueError(
                f"context window: need 0 < keep_tokens ({self.keep_tokens}) < window_tokens ({self.window_tokens})"
            )

    def full(self, kv_tokens: int) -> bool:
        return kv_tokens >= self.window_tokens


@dataclass
class _Turn:
    """A user turn and its answers, from the prefill that opened it (whose first rows close the answer before)."""

    entries: list[replay_pb2.ReplayEntry] = field(default_factory=list)


def _prefill_kind(entry: replay_pb2.ReplayEntry) -> int | None:
    return entry.prefill.kind if entry.HasField("prefill") else None


def _markup(entry: replay_pb2.ReplayEntry) -> int:
    return entry.prefill.close_tokens + entry.prefill.open_tokens if entry.HasField("prefill") else 0


def _sliced(entry: replay_pb2.ReplayEntry, start: int, end: int, close: int, open_: int) -> replay_pb2.ReplayEntry:
    rows = from_proto(entry.prefill.embeddings)[start:end].contiguous()
    prefill = replay_pb2.LoggedPrefill(kind=entry.prefill.kind, close_tokens=close, open_tokens=open_,
                                       embeddings=to_proto(rows))  # fmt: skip
    return replay_pb2.ReplayEntry(request_id=entry.request_id, llm_tokens=rows.shape[0], prefill=prefill)


def _markup_only(entry: replay_pb2.ReplayEntry) -> replay_pb2.ReplayEntry:
    """A dropped unit's turn markup (the rows that close the answer before it and open its turn)."""
    p = entry.prefill
    return _sliced(entry, 0, _markup(entry), p.close_tokens, p.open_tokens)


def _without_close(entry: replay_pb2.ReplayEntry) -> replay_pb2.ReplayEntry:
    """A turn's opening prefill without the rows that closed an answer which is no longer there."""
    p = entry.prefill
    return _sliced(entry, p.close_tokens, entry.llm_tokens, 0, p.open_tokens)


def _split_turns(entries: list[replay_pb2.ReplayEntry]) -> tuple[list[replay_pb2.ReplayEntry], list[_Turn]]:
    """(system entries, turns): a turn starts at the prefill that opens a user turn."""
    system: list[replay_pb2.ReplayEntry] = []
    turns: list[_Turn] = []
    for e in entries:
        if _prefill_kind(e) == SYSTEM and not turns:
            system.append(e)
        elif not turns or (e.HasField("prefill") and e.prefill.open_tokens > 0):
            turns.append(_Turn([e]))
        else:
            turns[-1].entries.append(e)
    return system, turns


def _text_tokens(turn: _Turn) -> int:
    """What a turn keeps whatever happens to its units: text, answers, markup."""
    return sum(_markup(e) if _prefill_kind(e) == UNIT else e.llm_tokens for e in turn.entries)


def retained(entries: list[replay_pb2.ReplayEntry], policy: WindowPolicy) -> list[replay_pb2.ReplayEntry]:
    """The log a rolled session keeps (see the module doc)."""
    system, turns = _split_turns(list(entries))
    budget = policy.keep_tokens - sum(e.llm_tokens for e in system)
    dropped_turns = False
    while len(turns) > 1 and sum(_text_tokens(t) for t in turns) > budget:
        turns.pop(0)  # the oldest turn goes whole; the one in progress always stays
        dropped_turns = True
    if dropped_turns and turns[0].entries[0].HasField("prefill") and turns[0].entries[0].prefill.close_tokens:
        turns[0].entries[0] = _without_close(turns[0].entries[0])  # the system prompt already ends its message
    budget -= sum(_text_tokens(t) for t in turns)
    kept_units: set[int] = set()
    for e in reversed([e for t in turns for e in t.entries if _prefill_kind(e) == UNIT]):  # newest first
        extra = e.llm_tokens - _markup(e)
        if extra > budget:
            break
        budget -= extra
        kept_units.add(id(e))
    out = list(system)
    for e in (e for t in turns for e in t.entries):
        if _prefill_kind(e) != UNIT or id(e) in kept_units:
            out.append(e)
        elif _markup(e):
            out.append(_markup_only(e))
    return out


def embeddings(entry: replay_pb2.ReplayEntry, embed_ids) -> torch.Tensor:
    """The rows an entry puts into the KV (`embed_ids`: token ids -> embeddings, for an answer's fed ids)."""
    if entry.HasField("prefill"):
        return from_proto(entry.prefill.embeddings)
    answer = entry.answer
    fed = embed_ids(torch.tensor(list(answer.fed_ids), dtype=torch.long))
    return torch.cat([from_proto(answer.prefix_embeddings).to(fed), fed])
