"""Fixture bodies shared by test folders; conftest.py registers them (these are plain functions).

    @pytest.fixture(scope="session")
    def tiny_checkpoint(tmp_path_factory):
        return tiny_checkpoint_dir(tmp_path_factory)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.tiny_checkpoint import make_tiny_checkpoint

TINY_SEED = 0


def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly generated tiny checkpoint (official layout, random weights) in a session temp directory."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), seed=TINY_SEED)
