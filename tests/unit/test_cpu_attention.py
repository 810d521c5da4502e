"""The CPU decode attention kernel (C++, built by `make setup`): equals the torch path, reads nothing but each row's
own keys, refuses reads outside the arena."""

from __future__ import annotations

import pytest
import torch

from services.llm_core.engine import cpu_attention
from services.llm_core.model import sequence_attention


def test_the_kernel_builds_here():
    """`make setup` builds it; every CPU test of the engine relies on it being there."""
    assert cpu_attention.load()


def torch_path(q, k, v, offsets, lengths):
    return torch.cat([sequence_attention(q[b : b + 1], k[:, o : o + n], v[:, o : o + n], None)
                      for b, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist()))])  # fmt: skip


def arena(kv_heads: int, rows: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(kv_heads, rows, head_dim, generator=g), torch.randn(kv_heads, rows, head_dim, generator=g)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 1, 128), (28, 4, 128), (4, 2, 64), (14, 2, 16)])
def test_equals_the_torch_path(heads, kv_heads, head_dim):
    """Query heads per KV head 1-7 (groups of 4 and a remainder), lengths that are not whole blocks of 8 keys or 32
    values, a row of one key, rows at the arena's end."""
    k, v = arena(kv_heads, 600, head_dim, seed=heads)
    offsets = torch.tensor([0, 40, 100, 300, 599])
    lengths = torch.tensor([33, 8, 199, 299, 1])
    q = torch.randn(5, heads, head_dim, generator=torch.Generator().manual_seed(1))
    out = cpu_attention.decode_attention(q, k, v, offsets, lengths)
    torch.testing.assert_close(out, torch_path(q, k, v, offsets, lengths), rtol=1e-5, atol=1e-5)


def test_threads_split_rows_not_results():
    k, v = arena(2, 4096, 64, seed=0)
    offsets, lengths = torch.tensor([0, 1024, 2048, 3072]), torch.tensor([1000, 777, 1024, 5])
    q = torch.randn(4, 8, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.decode_attention(q, k, v, offsets, lengths)
        torch.set_num_threads(2)
        two = cpu_attention.decode_attention(q, k, v, offsets, lengths)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_a_row_reads_only_its_own_keys():
    """NaN/inf everywhere outside a row's keys (before, after, between rows) leaves its output bit-exact."""
    k, v = arena(1, 200, 128, seed=2)
    offsets, lengths = torch.tensor([10, 120]), torch.tensor([50, 37])
    q = torch.randn(2, 4, 128)
    clean = cpu_attention.decode_attention(q, k, v, offsets, lengths)
    own = torch.zeros(200, dtype=torch.bool)
    own[10:60] = own[120:157] = True
    k[:, ~own], v[:, ~own] = float("nan"), float("inf")
    assert torch.equal(cpu_attention.decode_attention(q, k, v, offsets, lengths), clean)


def test_reads_outside_the_arena_are_refused():
    k, v = arena(1, 64, 16, seed=3)
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="outside the arena"):
        cpu_attention.decode_attention(q, k, v, torch.tensor([60]), torch.tensor([5]))
    with pytest.raises(RuntimeError, match="outside the arena"):
        cpu_attention.decode_attention(q, k, v, torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="no rows"):
        none = torch.tensor([], dtype=torch.long)
        cpu_attention.decode_attention(q[:0], k, v, none, none)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_attention.decode_attention(q.double(), k, v, torch.tensor([0]), torch.tensor([5]))
