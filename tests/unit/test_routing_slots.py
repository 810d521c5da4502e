"""Pure rank-slot logic of the session-affinity router (the Ray side is tested in tests/service/test_routing.py)."""

from __future__ import annotations

from services.runtime.routing import RankSlots, StickyKeys, owner_rank

SESSIONS = [f"s{i}" for i in range(300)]


def owners(slots: RankSlots, live: set[int], now: float) -> dict[str, int | None]:
    return {s: slots.owner(s, live, now) for s in SESSIONS}


def test_owner_rank_is_deterministic_and_spread():
    assert owner_rank("abc", range(3)) == owner_rank("abc", [2, 1, 0]) == owner_rank("abc", {0, 1, 2})
    counts = {r: 0 for r in range(3)}
    for i in range(3000):
        counts[owner_rank(f"x{i}", range(3))] += 1
    assert min(counts.values()) > 800


def test_scale_up_moves_sessions_only_to_the_new_rank():
    slots = RankSlots(missing_rank_patience_s=10)
    before = owners(slots, {0, 1, 2}, now=0)
    after = owners(slots, {0, 1, 2, 3}, now=1)
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert moved and all(after[s] == 3 for s in moved) and len(moved) < len(SESSIONS) / 2


def test_dead_rank_waits_for_its_replacement_within_patience():
    slots = RankSlots(missing_rank_patience_s=10)
    before = owners(slots, {0, 1, 2}, now=0)
    during = owners(slots, {0, 2}, now=5)
    for s in SESSIONS:
        assert during[s] == (None if before[s] == 1 else before[s])  # only rank 1's sessions wait
    assert owners(slots, {0, 1, 2}, now=8) == before  # replacement took rank 1 back: nobody else moved


def test_rank_gone_past_patience_falls_back_to_live_ranks():
    slots = RankSlots(missing_rank_patience_s=10)
    before = owners(slots, {0, 1, 2}, now=0)
    owners(slots, {0, 2}, now=1)
    late = owners(slots, {0, 2}, now=12)
    for s in SESSIONS:
        assert late[s] in {0, 2}
        if before[s] != 1:
            assert late[s] == before[s]


def test_trailing_slot_dropped_after_scale_down():
    slots = RankSlots(missing_rank_patience_s=10)
    owners(slots, {0, 1, 2}, now=0)
    owners(slots, {0, 1}, now=1)
    assert slots.n_slots == 3
    shrunk = owners(slots, {0, 1}, now=20)
    assert slots.n_slots == 2
    assert shrunk == {s: owner_rank(s, range(2)) for s in SESSIONS}


def test_no_live_rank_means_wait():
    assert RankSlots().owner("s", set(), now=0) is None


def test_sticky_keys_hold_their_replica_while_used_and_expire_when_idle():
    sticky = StickyKeys(idle_s=10)
    sticky.put("a", "r1", now=0)
    sticky.put("b", "r2", now=5)
    assert sticky.get("a", now=9) == "r1" and sticky.get("c", now=9) is None
    sticky.put("a", "r1", now=9)  # used again: a's clock restarts
    assert sticky.get("b", now=16) is None  # idle since 5
    assert sticky.get("a", now=16) == "r1" and len(sticky) == 1
    assert sticky.get("a", now=20) is None and len(sticky) == 0
