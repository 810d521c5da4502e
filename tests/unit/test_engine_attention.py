"""Attention backends over the KV arena: in-place reads equal the solo cache, rows are isolated from each other's
and from free rows' NaN/inf, the flex decode path (eager on CPU) equals the SDPA path, CUDA-graph bookkeeping."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from services.common.config import LLMConfig
from services.llm_core.engine import cpu_attention
from services.llm_core.engine.attention import ArenaAttention, SeqSpan
from services.llm_core.engine.cuda_graphs import (
    KERNEL_BLOCK,
    CudaGraphDecoder,
    DecodeTable,
    FlexDecodeAttention,
    bucket_for,
    graph_buckets,
)
from services.llm_core.engine.kv_cache import KVAllocator, KVArena
from services.llm_core.engine.runner import ForwardBatch, ModelRunner
from services.llm_core.model import LLMModel, random_llm_model

CFG = LLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, max_position_embeddings=4096, rope_theta=1e4)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> LLMModel:
    return random_llm_model(CFG, seed=0)


@pytest.fixture(params=["kernel", "torch"])
def decode_backend(request, monkeypatch) -> str:
    """CPU decode rows through the C++ kernel (what CPU replicas run) or the per-session torch path (CUDA eager
    steps, other dtypes, and CPUs where the kernel cannot be built)."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_attention, "usable", lambda kv: False)
    return request.param


def make_arena(block_size: int, num_blocks: int) -> tuple[KVAllocator, KVArena]:
    kv = KVAllocator(num_blocks, block_size)
    arena = KVArena(CFG.num_hidden_layers, num_blocks, block_size, CFG.num_key_value_heads, CFG.head_dim,
                    torch.float32, "cpu")  # fmt: skip
    return kv, arena


def prefill(model: LLMModel, kv: KVAllocator, attn: ArenaAttention, prompts: dict[str, torch.Tensor]) -> None:
    """Every prompt in one packed forward, as the engine would (reserve, run, commit)."""
    rows, spans, row = [], [], 0
    for sid, x in prompts.items():
        kv.create(sid)
        kv.reserve(sid, len(x))
        attn.arena.apply(kv.pop_ops())
        spans.append(SeqSpan(row, len(x), kv.offset(sid), 0))
        rows.append(torch.arange(len(x)))
        row += len(x)
    attn.prepare(spans)
    model.forward(torch.cat(list(prompts.values())), torch.cat(rows), attn)
    for sid, x in prompts.items():
        kv.commit(sid, len(x))


def decode_logits(model: LLMModel, kv: KVAllocator, attn: ArenaAttention, sids: list[str], ids: torch.Tensor):
    """One batched decode row per session (reserved, not committed: the step can be run again)."""
    for sid in sids:
        kv.reserve(sid, 1)
    attn.arena.apply(kv.pop_ops())
    lens = [kv.num_tokens(s) for s in sids]
    attn.prepare([SeqSpan(i, 1, kv.offset(s), n) for i, (s, n) in enumerate(zip(sids, lens))])
    return model.compute_logits(model.forward(model.embed_tokens(ids), torch.tensor(lens), attn))


def test_arena_rows_equal_the_solo_cache(model, decode_backend):
    """Prefill chunks after earlier rows (float causal mask) and decode rows read in place give what a solo run
    gives."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(13, CFG.hidden_size, generator=g), torch.randn(7, CFG.hidden_size, generator=g)
    kv, arena = make_arena(block_size=4, num_blocks=32)
    attn = ArenaAttention(arena)
    assert attn.kernel == (decode_backend == "kernel")
    prefill(model, kv, attn, {"s": a[:5], "t": b})
    kv.reserve("s", 8)  # t sits right after s: s moves
    arena.apply(kv.pop_ops())
    assert kv.moves == 1
    attn.prepare([SeqSpan(0, 8, kv.offset("s"), 5)])
    chunk = model.forward(a[5:], torch.arange(5, 13), attn)
    kv.commit("s", 8)
    solo = model.new_cache()
    _, ref = model.step(a, solo)
    torch.testing.assert_close(chunk, ref[5:], rtol=1e-5, atol=1e-5)
    ids = torch.tensor([3, 4])
    ref_logits, _ = model.step(model.embed_tokens(ids[:1]), solo)
    torch.testing.assert_close(decode_logits(model, kv, attn, ["s", "t"], ids)[:1], ref_logits, rtol=1e-5, atol=1e-5)


def test_nan_in_a_freed_run_or_another_session_never_reaches_a_row(model, decode_backend):
    """Poison the run of a dropped session and the whole KV of a live batch mate with NaN/inf: the other
    sessions' logits of the same step stay bit-exact; the poisoned session's own row is non-finite."""
    g = torch.Generator().manual_seed(2)
    prompts = {sid: torch.randn(n, CFG.hidden_size, generator=g) for sid, n in (("a", 9), ("b", 6), ("c", 11))}
    kv, arena = make_arena(block_size=4, num_blocks=32)
    attn = ArenaAttention(arena)
    prefill(model, kv, attn, prompts)
    c_start, c_blocks = kv.run("c")
    kv.free("c")
    arena.apply(kv.pop_ops())
    ids = torch.tensor([5, 6])
    clean = decode_logits(model, kv, attn, ["a", "b"], ids)
    freed = slice(c_start * 4, (c_start + c_blocks) * 4)
    arena.k[:, :, freed] = float("nan")
    arena.v[:, :, freed] = float("inf")
    b_rows = slice(kv.offset("b"), kv.offset("b") + kv.num_tokens("b"))
    arena.k[:, :, b_rows] = float("inf")
    arena.v[:, :, b_rows] = float("nan")
    poisoned = decode_logits(model, kv, attn, ["a", "b"], ids)
    assert torch.equal(poisoned[0], clean[0])
    assert not torch.isfinite(poisoned[1]).any()


def test_graph_buckets_and_bucket_choice():
    assert graph_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert graph_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert [bucket_for(n, graph_buckets(64)) for n in (1, 3, 16, 17, 64, 65)] == [1, 4, 16, 32, 64, None]


def test_decode_table_lists_only_each_rows_own_blocks_and_pads_the_rest():
    _, arena = make_arena(block_size=KERNEL_BLOCK, num_blocks=6)
    table = DecodeTable(max_rows=4, arena=arena)
    spans = [SeqSpan(0, 1, 0, 127), SeqSpan(1, 1, 2 * KERNEL_BLOCK, 300)]  # in block 0; in blocks 2..4
    table.fill(spans)
    assert table.write_rows.tolist() == [127, 556, arena.scratch_row, arena.scratch_row]
    assert table.kv_start.tolist() == [0, 256, 0, 0] and table.kv_end.tolist() == [128, 557, 0, 0]
    assert table.kv_num_blocks[:, 0, 0].tolist() == [1, 3, 0, 0]  # padding rows read nothing
    assert table.kv_indices[0, 0, 0, :1].tolist() == [0] and table.kv_indices[1, 0, 0, :3].tolist() == [2, 3, 4]
    assert int(table.kv_indices.max()) < arena.k.shape[2] // KERNEL_BLOCK
    table.fill(spans[1:])  # a smaller step: the rows past it become padding
    assert table.kv_num_blocks[:, 0, 0].tolist() == [3, 0, 0, 0] and table.write_rows[1] == arena.scratch_row


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_decode_equals_the_sdpa_path(model):
    """The CUDA graphs' decode backend, run eagerly on CPU (flex attention's reference implementation), against
    ArenaAttention on the same arena: same logits, with a padding row in the bucket."""
    g = torch.Generator().manual_seed(3)
    prompts = {sid: torch.randn(n, CFG.hidden_size, generator=g) for sid, n in (("a", 130), ("b", 5))}
    kv, arena = make_arena(block_size=KERNEL_BLOCK, num_blocks=4)
    attn = ArenaAttention(arena)
    prefill(model, kv, attn, prompts)
    ids = torch.tensor([7, 8])
    ref = decode_logits(model, kv, attn, ["a", "b"], ids)
    table = DecodeTable(max_rows=4, arena=arena)
    lens = [kv.num_tokens("a"), kv.num_tokens("b")]
    table.fill([SeqSpan(i, 1, kv.offset(s), n) for i, (s, n) in enumerate(zip("ab", lens))])
    flex = FlexDecodeAttention(arena, table, rows=3)  # bucket of 3: one padding row
    embeds = torch.cat([model.embed_tokens(ids), torch.zeros(1, CFG.hidden_size)])
    out = model.compute_logits(model.forward(embeds, torch.tensor([*lens, 0]), flex))
    torch.testing.assert_close(out[:2], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_runner_splits_decode_rows_to_the_graph_decoder_and_runs_prefills_eagerly(model):
    """The CUDA step layout on CPU: the graph decoder without capture (same buckets, static tables, flex) takes the
    decode rows, the prefill chunks run as a second forward; logits and hidden states equal the all-eager step."""
    g = torch.Generator().manual_seed(4)
    prompts = {sid: torch.randn(n, CFG.hidden_size, generator=g) for sid, n in (("a", 140), ("b", 9), ("c", 20))}
    kv, arena = make_arena(block_size=KERNEL_BLOCK, num_blocks=8)
    prefill(model, kv, ArenaAttention(arena), prompts)
    for sid, n in (("a", 1), ("b", 1), ("c", 6)):
        kv.reserve(sid, n)
    kv.create("d")
    kv.reserve("d", 5)
    arena.apply(kv.pop_ops())
    lens = {sid: kv.num_tokens(sid) for sid in "abc"}
    spans = [
        SeqSpan(0, 1, kv.offset("a"), lens["a"]),
        SeqSpan(1, 1, kv.offset("b"), lens["b"]),
        SeqSpan(2, 6, kv.offset("c"), lens["c"]),  # a chunk after earlier rows
        SeqSpan(8, 5, kv.offset("d"), 0),  # a new session
    ]
    batch = ForwardBatch(
        embeds=torch.cat([model.embed_tokens(torch.tensor([1, 2])), torch.randn(11, CFG.hidden_size, generator=g)]),
        positions=torch.tensor([lens["a"], lens["b"], *range(lens["c"], lens["c"] + 6), *range(5)]),
        spans=spans,
        num_decodes=2,
        logit_rows=torch.tensor([0, 1, 7]),
        hidden_rows=torch.tensor([12, 4]),
    )
    eager = ModelRunner(model, arena)
    ref_logits, ref_hidden = eager.forward(batch)
    split = ModelRunner(model, arena)
    split.graphs = CudaGraphDecoder(model, arena, max_rows=4, capture=False)
    logits, hidden = split.forward(batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)
    decode_only = replace(batch, embeds=batch.embeds[:2], positions=batch.positions[:2], spans=spans[:2],
                          logit_rows=torch.tensor([0, 1]), hidden_rows=torch.tensor([], dtype=torch.long))  # fmt: skip
    torch.testing.assert_close(split.forward(decode_only)[0], ref_logits[:2], rtol=1e-4, atol=1e-4)
