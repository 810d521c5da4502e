"""What an LLMCore replica promises each session of its KV arena, and so how many live sessions it takes on.

A live session may grow to `max_session_tokens`, and while its context rolls (`context_window.py`) a second KV is
built beside it, holding what the roll keeps plus what arrives before the switch. A replica that promises every
session its whole limit, and takes a session on only while one roll's worth of it stays unpromised, never fails a
session's unit because another session grew, and can always build some roll (the live KV stops at the limit and
waits for it). The price is density: `live_sessions` of them per arena, however short they are for now. Pure
arithmetic on the deployment's settings; the engine's `Reservation` enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.llm_core.context_window import WindowPolicy
from services.llm_core.engine.kv_cache import Reservation


@dataclass(frozen=True)
class AdmissionPolicy:
    kv_budget_tokens: int
    max_session_tokens: int
    window: WindowPolicy
    block_size: int

    def __post_init__(self) -> None:
        if self.live_sessions < 1:
            raise ValueError(
                f"kv_budget_tokens {self.kv_budget_tokens} cannot hold one live session of max_session_tokens "
                f"{self.max_session_tokens} and a context roll beside it ({self.roll_tokens} tokens)"
            )

    @classmethod
    def kv_budget_for(cls, live_sessions: int, max_session_tokens: int, window: WindowPolicy) -> int:
        """The `kv_budget_tokens` that admits `live_sessions` (with whole blocks, when both limits are whole)."""
        return live_sessions * max_session_tokens + window.keep_tokens + max_session_tokens - window.window_tokens

    @property
    def roll_tokens(self) -> int:
        """The most a roll's KV holds: what it keeps, plus the units that arrive while it is built (the live KV
        goes from the window to the hard limit at most)."""
        return self.kv_budget_for(0, self.max_session_tokens, self.window)

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def live_sessions(self) -> int:
        """Live sessions the arena holds, each at its limit, with one roll's room to spare."""
        return (self._blocks(self.kv_budget_tokens) - self._blocks(self.roll_tokens)) // self._blocks(
            self.max_session_tokens
        )

    def session_load(self, promised_tokens: int) -> float:
        """The share of the live-session room that is promised: 1.0 when one more live session is refused (what
        LLMCore reports to its autoscaling policy, `services.runtime.autoscaling`)."""
        room = self.live_sessions * self._blocks(self.max_session_tokens) * self.block_size
        return promised_tokens / room

    def live(self) -> Reservation:
        return Reservation(self.max_session_tokens, headroom=self.roll_tokens)

    def chat(self, prompt_tokens: int, max_new_tokens: int) -> Reservation:
        """A one-shot chat: its prompt and its longest answer."""
        return Reservation(min(prompt_tokens + max_new_tokens, self.max_session_tokens), headroom=self.roll_tokens)

    def roll(self) -> Reservation:
        return Reservation(self.roll_tokens)
