"""TDM muxer: pure logic, no services needed."""

from __future__ import annotations

import numpy as np
import pytest

from services.gateway.tdm import TDMInputError, TDMMuxer

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
        assert not u.partial
    assert mux.pending_samples == 5000
    np.testing.assert_array_equal(mux.pending_audio(), ramp(5000, 3 * SR))
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


def test_frames_attach_to_the_unit_being_filled_and_latest_wins():
    mux = TDMMuxer()
    mux.push_frame("x")
    mux.push_audio(ramp(8000))
    mux.push_frame("y")  # arrival order: latest of second 0
    (u0,) = mux.push_audio(ramp(8000, 8000))
    mux.push_frame("z")  # audio sits exactly on the boundary: belongs to second 1
    assert mux.pending_frame == "z"
    (u1,) = mux.push_audio(ramp(SR, SR))
    (u2,) = mux.push_audio(ramp(SR, 2 * SR))
    assert (u0.frame, u1.frame, u2.frame) == ("y", "z", None)


def test_flush_of_frame_only_and_next_unit_starts_at_flush_point():
    mux = TDMMuxer()
    mux.push_frame("only")
    (unit,) = mux.flush()
    assert unit.partial and unit.audio.shape == (0,) and unit.frame == "only"
    mux.push_audio(ramp(4000))
    (tail,) = mux.flush()
    assert tail.seq == 1 and tail.audio.shape == (4000,)
    (nxt,) = mux.push_audio(ramp(SR, 4000))
    assert nxt.seq == 2
    np.testing.assert_array_equal(nxt.audio, ramp(SR, 4000))


def test_sequence_continues_from_first_seq():
    mux = TDMMuxer(first_seq=7)
    assert [u.seq for u in mux.push_audio(ramp(2 * SR))] == [7, 8]


@pytest.mark.parametrize("bad", [np.zeros((2, 100), np.float32), np.zeros(100, np.int16)])
def test_bad_audio_is_refused(bad):
    with pytest.raises(TDMInputError):
        TDMMuxer().push_audio(bad)
