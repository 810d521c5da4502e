"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest
import torch

from tests.golden import GoldenSet

torch.manual_seed(0)


@pytest.fixture(scope="session")
def golden() -> GoldenSet:
    return GoldenSet()
