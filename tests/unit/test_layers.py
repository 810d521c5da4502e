"""The shared layer blocks compute transformers' results bit for bit: `rms_norm` as Llama's and Qwen2's RMSNorm,
`Rotation` as `apply_rotary_pos_emb` (on the LLM's packed rows and on the speech decoder's stacked queries and
keys), in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rotary
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2_rotary

from services.common.layers import Rotation, rms_norm

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 96, 3, 1, 32
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return (3 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [LlamaRMSNorm, Qwen2RMSNorm])
@pytest.mark.parametrize("rows", [(1,), (1, 1), (4, 1), (2, 57)])
def test_rms_norm_is_the_module_bit_for_bit(dtype, norm_type, rows):
    norm = norm_type(HIDDEN, eps=1e-6).to(dtype)
    norm.weight.data = randn(HIDDEN, seed=0, dtype=dtype)
    x = randn(*rows, HIDDEN, seed=1, dtype=dtype)
    assert torch.equal(rms_norm(norm, x), norm(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotation_of_packed_rows_is_qwen2s(dtype):
    """The LLM's layout: N packed rows, q (N, heads, d) and k (N, kv_heads, d), cos/sin (N, d)."""
    rotary = Qwen2RotaryEmbedding(Qwen2Config(hidden_size=HIDDEN, num_attention_heads=HEADS))
    n = 37
    positions = torch.randint(0, 4000, (1, n), generator=torch.Generator().manual_seed(2))
    q, k = randn(n, HEADS, HEAD_DIM, seed=3, dtype=dtype), randn(n, KV_HEADS, HEAD_DIM, seed=4, dtype=dtype)
    cos, sin = rotary(q, positions)
    expected_q, expected_k = qwen2_rotary(q, k, cos[0], sin[0], unsqueeze_dim=1)
    rotation = Rotation(cos[0], sin[0])
    assert torch.equal(rotation(q), expected_q) and torch.equal(rotation(k), expected_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [(1, 1), (4, 1), (2, 57)])
def test_rotation_of_stacked_queries_and_keys_is_llamas(dtype, rows):
    """The speech decoder's layout: queries and keys stacked (2, B, heads, q, d), cos/sin (B, q, d)."""
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS))
    positions = torch.randint(0, 2000, rows, generator=torch.Generator().manual_seed(5))
    qk = randn(2, rows[0], HEADS, rows[1], HEAD_DIM, seed=6, dtype=dtype)
    cos, sin = rotary(qk, positions)
    expected = llama_rotary(qk[0], qk[1], cos, sin)
    got = Rotation(cos, sin)(qk)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
