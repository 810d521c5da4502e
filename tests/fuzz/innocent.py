"""Traffic of another API key while a test attacks the service: greedy chats that must get exactly the tokens
they get alone, however the attacker's requests are batched with them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from services.client.sdk import MiniCPMOClient, generation_options, text, user

# Prompts of different lengths, so their rows in a decode batch are padded (reading each other's KV layout).
PROMPTS = ("Tell me a story about the sea.", "Hi", "Describe, step by step and for a child, how a steam engine works.")
TOKENS = 24
DECODING_TIMEOUT_S = 60.0


class InnocentTraffic:
    def __init__(self, target: str, api_key: str, prompts: tuple[str, ...] = PROMPTS, n_tokens: int = TOKENS):
        self.client = MiniCPMOClient(target, api_key=api_key)
        self.prompts = prompts
        self.options = generation_options(max_new_tokens=n_tokens, min_new_tokens=n_tokens, greedy=True)
        self.alone = {p: self._ask(p) for p in prompts}  # one at a time, before any concurrent traffic
        self.failures: list[str] = []
        self.answers = 0
        self.note = ""  # what the attacker is doing now, quoted in failures
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()

    def _ask(self, prompt: str, on_event=None) -> list[int]:
        return self.client.chat([user(text(prompt))], options=self.options, on_event=on_event).token_ids

    def check(self, prompt: str, on_event=None) -> None:
        """One answer, compared with its answer alone; a difference or an error is recorded in `failures`."""
        try:
            got = self._ask(prompt, on_event)
        except grpc.RpcError as e:
            failure = f"{prompt!r} failed with {e.code().name}: {e.details()}"
        else:
            expected = self.alone[prompt]
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            failure = None if got == expected else f"{prompt!r} got other tokens than alone from token {first} on"
        with self._lock:
            self.answers += 1
            if failure is not None:
                self.failures.append(f"{failure}{' ' + self.note if self.note else ''}")

    @contextmanager
    def alongside(self) -> Iterator[InnocentTraffic]:
        """Every prompt asked back to back, concurrently, for as long as the body runs; the body starts once each
        stream is decoding, so the body's requests share decode steps with them. `failures` are this run's."""
        self.failures.clear()
        stop = threading.Event()
        decoding = [threading.Event() for _ in self.prompts]

        def loop(prompt: str, started: threading.Event) -> None:
            while True:
                self.check(prompt, on_event=lambda ev: started.set())
                started.set()  # also after a failure, so the body is not held up
                if stop.is_set():
                    return

        threads = [threading.Thread(target=loop, args=(p, d), daemon=True) for p, d in zip(self.prompts, decoding)]
        for t in threads:
            t.start()
        try:
            for d in decoding:
                d.wait(DECODING_TIMEOUT_S)
            yield self
        finally:
            stop.set()
            for t in threads:
                t.join()
