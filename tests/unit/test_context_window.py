"""The rolling context window's choice of what a live session keeps: pure logic over replay entries."""

from __future__ import annotations

import itertools

import pytest
import torch

from protos.minicpmo.v1 import replay_pb2
from services.common.tensor_codec import to_proto
from services.llm_core.context_window import SYSTEM, TEXT, UNIT, WindowPolicy, embeddings, retained

_rows = itertools.count()


def prefill(kind: int, n: int, close: int = 0, open_: int = 0) -> replay_pb2.ReplayEntry:
    """An entry whose n rows are numbered globally (row i holds i), so what is kept can be read off the values."""
    rows = torch.tensor([[float(next(_rows))] for _ in range(n)])
    return replay_pb2.ReplayEntry(
        request_id=f"r{rows[0, 0]:.0f}", llm_tokens=n,
        prefill=replay_pb2.LoggedPrefill(kind=kind, close_tokens=close, open_tokens=open_, embeddings=to_proto(rows)),
    )  # fmt: skip


def answer(prefix: int, fed: int) -> replay_pb2.ReplayEntry:
    rows = torch.tensor([[float(next(_rows))] for _ in range(prefix)])
    ids = [1000 + next(_rows) for _ in range(fed)]
    return replay_pb2.ReplayEntry(
        request_id=f"a{ids[0] if ids else 0}", llm_tokens=prefix + fed,
        answer=replay_pb2.LoggedAnswer(prefix_embeddings=to_proto(rows), fed_ids=ids, streamed_ids=ids + [7]),
    )  # fmt: skip


def values(entries) -> list[float]:
    embed_ids = lambda ids: ids.float()[:, None]  # noqa: E731 (an answer's fed ids as their own rows)
    return torch.cat([embeddings(e, embed_ids) for e in entries])[:, 0].tolist()


def conversation():
    """system; turn 1: 3 units (the first opens the turn), an answer; turn 2: text, 2 units; each unit 10 rows."""
    system = prefill(SYSTEM, 20)
    t1 = [prefill(UNIT, 10, open_=3), prefill(UNIT, 10), prefill(UNIT, 10), answer(8, 5)]
    t2 = [prefill(TEXT, 6, close=2, open_=3), prefill(UNIT, 10), prefill(UNIT, 10)]
    return system, t1, t2


def test_under_the_window_nothing_changes_when_everything_fits():
    system, t1, t2 = conversation()
    log = [system, *t1, *t2]
    assert retained(log, WindowPolicy(window_tokens=500, keep_tokens=400)) == log


def test_oldest_units_go_first_keeping_their_turn_markup():
    system, t1, t2 = conversation()
    log = [system, *t1, *t2]
    text = 20 + 3 + 13 + 6  # system, turn 1's markup and answer, turn 2's text (its markup inside)
    kept = retained(log, WindowPolicy(window_tokens=200, keep_tokens=text + 25))  # room for two units
    assert values(kept) == values([system]) + values(t1)[:3] + values(t1[3:]) + values(t2)
    assert [e.llm_tokens for e in kept] == [20, 3, 13, 6, 10, 10]
    assert kept[1].prefill.open_tokens == 3  # the first unit left its turn-opening markup behind


def test_units_are_kept_newest_first_and_contiguous():
    system, t1, t2 = conversation()
    log = [system, *t1, *t2]
    kept = retained(log, WindowPolicy(window_tokens=200, keep_tokens=42 + 10))  # room for one unit
    assert values(kept) == values([system]) + values(t1)[:3] + values(t1[3:]) + values(t2[:1]) + values(t2[2:])


def test_when_the_text_does_not_fit_the_oldest_turn_goes_whole():
    system, t1, t2 = conversation()
    log = [system, *t1, *t2]
    kept = retained(log, WindowPolicy(window_tokens=200, keep_tokens=30))
    # turn 1 is gone; turn 2 loses the rows that closed turn 1's answer (the system prompt ends its message)
    opening = kept[1]
    assert (opening.prefill.close_tokens, opening.prefill.open_tokens, opening.llm_tokens) == (0, 3, 4)
    assert values(kept[:2]) == values([system]) + values(t2[:1])[2:]
    assert [e.prefill.kind for e in kept] == [SYSTEM, TEXT, UNIT, UNIT][: len(kept)]


def test_rolling_again_is_stable():
    system, t1, t2 = conversation()
    policy = WindowPolicy(window_tokens=200, keep_tokens=42 + 10)
    once = retained([system, *t1, *t2], policy)
    assert values(retained(once, policy)) == values(once)


def test_policy_bounds():
    with pytest.raises(ValueError):
        WindowPolicy(window_tokens=100, keep_tokens=100)
    assert WindowPolicy(100, 50).full(100) and not WindowPolicy(100, 50).full(99)
