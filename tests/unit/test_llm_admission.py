"""What an LLMCore replica promises each session of its KV arena (pure arithmetic on its settings)."""

from __future__ import annotations

import pytest

from services.llm_core.admission import AdmissionPolicy
from services.llm_core.context_window import WindowPolicy
from services.llm_core.engine.kv_cache import Reservation

DEFAULT_WINDOW = WindowPolicy(6144, 3072)


def test_live_sessions_are_promised_their_limit_with_a_rolls_room_kept_free():
    policy = AdmissionPolicy(65536, 8192, DEFAULT_WINDOW, block_size=128)
    assert policy.roll_tokens == 3072 + 8192 - 6144
    assert policy.live() == Reservation(8192, headroom=5120)
    assert policy.roll() == Reservation(5120)
    assert policy.live_sessions == 7, "8 x 8192 fill the arena: no roll could ever be built"
    budget = AdmissionPolicy.kv_budget_for(8, 8192, DEFAULT_WINDOW)
    assert budget == 8 * 8192 + 5120 and AdmissionPolicy(budget, 8192, DEFAULT_WINDOW, 128).live_sessions == 8
    assert AdmissionPolicy(budget - 128, 8192, DEFAULT_WINDOW, 128).live_sessions == 7


def test_a_chat_is_promised_its_prompt_and_longest_answer_within_the_session_limit():
    policy = AdmissionPolicy(65536, 8192, DEFAULT_WINDOW, block_size=128)
    assert policy.chat(100, 512) == Reservation(612, headroom=5120)
    assert policy.chat(8000, 2048) == Reservation(8192, headroom=5120)


def test_live_sessions_count_whole_blocks():
    # 64 tokens and a 44-token roll are one 128-token block each: 3 blocks hold 2 sessions and a roll
    assert AdmissionPolicy(384, 64, WindowPolicy(40, 20), block_size=128).live_sessions == 2


def test_an_arena_that_cannot_hold_one_session_and_a_roll_is_a_configuration_error():
    with pytest.raises(ValueError, match="cannot hold one live session"):
        AdmissionPolicy(8192, 8192, DEFAULT_WINDOW, block_size=128)


def test_session_load_is_the_share_of_the_live_session_room_promised():
    policy = AdmissionPolicy(65536, 8192, DEFAULT_WINDOW, block_size=128)  # 7 live sessions
    assert policy.session_load(0) == 0.0
    assert policy.session_load(7 * 8192) == 1.0, "full: the next live session is refused"
    assert policy.session_load(3 * 8192 + 612) == pytest.approx((3 + 612 / 8192) / 7)  # 3 sessions and a chat
