"""Inputs of the e2e tests, read from the golden set's input files (never hard-coded)."""

from __future__ import annotations

import numpy as np

from tests.golden import GoldenSet


def wav(golden: GoldenSet, name: str) -> np.ndarray:
    return golden.wav(f"inputs/{name}")


def image_bytes(golden: GoldenSet, name: str) -> bytes:
    return golden.path(f"inputs/{name}").read_bytes()


def chunks(pcm: np.ndarray, size: int) -> list[np.ndarray]:
    """The audio as a client streams it: pieces of `size` samples (the last one shorter)."""
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]
