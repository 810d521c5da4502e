"""TDM muxer and reorder buffer: pure logic, no services needed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from services.gateway.tdm import UNIT_TOKEN, TDMInputError, TDMMuxer, UnitReorderBuffer

SR = 16000


def ramp(n_samples: int, start: int = 0) -> np.ndarray:
    """Audio whose every sample encodes its absolute index, so re-cut units can be checked exactly."""
    return (np.arange(start, start + n_samples, dtype=np.float64) / 1e6).astype(np.float32)


def push_in_chunks(mux: TDMMuxer, total: int, sizes: list[int]) -> list:
    units, offset, i = [], 0, 0
    while offset < total:
        n = min(sizes[i % len(sizes)], total - offset)
        units += mux.push_audio(ramp(n, offset))
        offset += n
        i += 1
    return units


@pytest.mark.parametrize("sizes", [[1600], [3200], [1601, 2399, 17], [16000], [40000], [7], [16001, 15999]])
def test_any_chunk_sizes_give_exact_one_second_units(sizes):
    mux = TDMMuxer()
    units = push_in_chunks(mux, 3 * SR + 5000, sizes)
    assert [u.seq for u in units] == [0, 1, 2]
    for i, u in enumerate(units):
        assert u.audio.dtype == np.float32 and u.audio.shape == (SR,)
        np.testing.assert_array_equal(u.audio, ramp(SR, i * SR))
        assert u.start_s == i and not u.partial and u.duration_s == 1.0
    assert mux.pending_samples == 5000
    tail = mux.flush()
    assert len(tail) == 1 and tail[0].partial and tail[0].seq == 3
    np.testing.assert_array_equal(tail[0].audio, ramp(5000, 3 * SR))
    assert mux.flush() == []


def test_unit_emitted_as_soon_as_its_second_completes():
    mux = TDMMuxer()
    assert mux.push_audio(ramp(SR - 1)) == []
    (unit,) = mux.push_audio(ramp(1, SR - 1))
    assert unit.seq == 0 and mux.pending_samples == 0


def test_one_big_chunk_emits_several_units_in_order():
    mux = TDMMuxer()
    units = mux.push_audio(ramp(4 * SR + 1))
    assert [u.seq for u in units] == [0, 1, 2, 3] and mux.pending_samples == 1


def test_frames_before_audio_go_to_their_second_and_latest_wins():
    mux = TDMMuxer()
    for t, name in [(0.2, "a"), (0.9, "b"), (1.0, "c"), (1.5, "d"), (2.0, "e")]:
        assert mux.push_frame(name, t) == []
    units = push_in_chunks(mux, 3 * SR, [3200])
    # window (start, end]: the frame at exactly 1.0 s is unit 0's, as upstream's frame_at_(i+1)s
    assert [(u.frame, u.frame_timestamp_s) for u in units] == [("c", 1.0), ("e", 2.0), (None, None)]
    assert mux.stats.superseded_frames == 3 and mux.stats.late_frames == 0


def test_frames_arriving_out_of_timestamp_order():
    mux = TDMMuxer()
    mux.push_frame("late-stamp", 0.8)
    mux.push_frame("early-stamp", 0.1)
    (unit,) = mux.push_audio(ramp(SR))
    assert unit.frame == "late-stamp"


def test_frame_after_its_second_was_emitted_is_dropped_as_late():
    mux = TDMMuxer()
    mux.push_audio(ramp(SR + 800))
    mux.push_frame("too-late", 0.7)
    mux.push_frame("too-late-boundary", 1.0)
    mux.push_frame("in-time", 1.3)
    (unit,) = mux.push_audio(ramp(SR - 800, SR + 800))
    assert unit.seq == 1 and unit.frame == "in-time"
    assert mux.stats.late_frames == 2


def test_frame_at_time_zero_belongs_to_first_unit():
    mux = TDMMuxer()
    mux.push_frame("f0", 0.0)
    (unit,) = mux.push_audio(ramp(SR))
    assert unit.frame == "f0"


def test_untimed_frames_attach_to_the_unit_being_filled():
    mux = TDMMuxer()
    mux.push_frame("x")
    mux.push_audio(ramp(8000))
    mux.push_frame("y")  # arrival order: latest of second 0
    (u0,) = mux.push_audio(ramp(8000, 8000))
    mux.push_frame("z")  # audio sits exactly on the boundary: belongs to second 1
    (u1,) = mux.push_audio(ramp(SR, SR))
    assert (u0.frame, u0.frame_timestamp_s, u1.frame) == ("y", None, "z")
    assert mux.stats.superseded_frames == 1


def test_parts_follow_upstream_layout():
    mux = TDMMuxer()
    mux.push_frame(b"jpeg", 0.5)
    (with_frame,) = mux.push_audio(ramp(SR))
    (without_frame,) = mux.push_audio(ramp(SR, SR))
    parts = with_frame.parts()
    assert parts[0] == UNIT_TOKEN and parts[1] == b"jpeg" and parts[2] is with_frame.audio
    assert len(without_frame.parts()) == 2 and without_frame.parts()[0] == UNIT_TOKEN


def test_flush_of_frame_only_and_next_unit_starts_at_flush_point():
    mux = TDMMuxer()
    mux.push_frame("only", 0.4)
    (unit,) = mux.flush()
    assert unit.partial and unit.audio.shape == (0,) and unit.frame == "only"
    mux.push_audio(ramp(4000))
    (tail,) = mux.flush()
    assert tail.seq == 1 and tail.audio.shape == (4000,)
    (nxt,) = mux.push_audio(ramp(SR, 4000))
    assert nxt.seq == 2 and nxt.start_s == 4000 / SR
    np.testing.assert_array_equal(nxt.audio, ramp(SR, 4000))


def test_flush_without_anything_pending_emits_nothing():
    assert TDMMuxer().flush() == []


def test_sequence_continues_from_first_seq():
    mux = TDMMuxer(first_seq=7)
    assert [u.seq for u in mux.push_audio(ramp(2 * SR))] == [7, 8]


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 100), np.float32), np.zeros(100, np.int16), np.array([0.0, np.nan], np.float32)],
)
def test_bad_audio_is_refused(bad):
    with pytest.raises(TDMInputError):
        TDMMuxer().push_audio(bad)


def test_frame_limits():
    mux = TDMMuxer(max_frame_lead_s=2.0, max_pending_frames=3)
    with pytest.raises(TDMInputError, match="ahead of the audio"):
        mux.push_frame("far", 2.5)
    with pytest.raises(TDMInputError, match="finite"):
        mux.push_frame("neg", -1.0)
    for t in (0.1, 0.2, 0.3):
        mux.push_frame("f", t)
    with pytest.raises(TDMInputError, match="wait for audio"):
        mux.push_frame("f", 0.4)


def test_only_16khz_is_accepted():
    with pytest.raises(TDMInputError, match="16 kHz"):
        TDMMuxer(sample_rate=24000)


def test_reorder_buffer_releases_in_sequence_each_once():
    rng = random.Random(3)
    order = list(range(50))
    rng.shuffle(order)
    buf = UnitReorderBuffer()
    released = []
    for seq in order:
        released += buf.put(seq, f"emb{seq}")
    assert released == [(i, f"emb{i}") for i in range(50)]
    assert buf.pending == 0 and buf.next_seq == 50


def test_reorder_buffer_holds_until_gap_filled():
    buf = UnitReorderBuffer(first_seq=10)
    assert buf.put(12, "c") == [] and buf.put(11, "b") == []
    assert buf.pending == 2
    assert buf.put(10, "a") == [(10, "a"), (11, "b"), (12, "c")]


def test_reorder_buffer_refuses_duplicates_and_far_ahead():
    buf = UnitReorderBuffer(capacity=4)
    buf.put(0, "a")
    with pytest.raises(TDMInputError, match="already delivered"):
        buf.put(0, "again")
    buf.put(2, "c")
    with pytest.raises(TDMInputError, match="already delivered"):
        buf.put(2, "again")
    with pytest.raises(TDMInputError, match="ahead"):
        buf.put(5, "far")


def test_reorder_buffer_skip_lets_later_units_flow():
    buf = UnitReorderBuffer()
    assert buf.put(1, "b") == []
    assert buf.skip(0) == [(1, "b")]
    assert buf.next_seq == 2
