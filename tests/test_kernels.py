"""Paged KV cache and paged attention kernels against their dense PyTorch references."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rayfleet.kernels import cpu_kernels
from rayfleet.kernels.attention import (
    AttentionWorkspace,
    PagedAttentionPlan,
    paged_attention,
    reference_attention,
)
from rayfleet.kernels.cache import swap_blocks, write_kv_cache


@pytest.fixture(params=["reference", "cpu-kernel"])
def decode_path(request, monkeypatch):
    """Run a test with decode rows on the PyTorch reference path and on the C++ CPU kernel
    (which must build here: RAYFLEET_CPU_KERNELS=1 makes a failed build an error)."""
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "0" if request.param == "reference" else "1")
    if request.param == "cpu-kernel":
        assert cpu_kernels.available()
    return request.param


def _setup_batch(seqs, hq, hkv, d, block_size, num_blocks, seed=0, dtype=torch.float32):
    """seqs: list of (context_len, query_len). Writes each sequence's full K/V into the paged
    cache at randomly chosen blocks; returns the dense tensors and the kernel arguments."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    k_cache = torch.zeros(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, dense, queries = [], [], []
    for ctx, q in seqs:
        nb = -(-ctx // block_size)
        blocks = [free.pop() for _ in range(nb)]
        tables.append(blocks)
        k = torch.randn(ctx, hkv, d, generator=g, dtype=dtype)
        v = torch.randn(ctx, hkv, d, generator=g, dtype=dtype)
        slots = torch.tensor(
            [blocks[p // block_size] * block_size + p % block_size for p in range(ctx)]
        )
        write_kv_cache(k, v, k_cache, v_cache, slots)
        dense.append((k, v))
        queries.append(torch.randn(q, hq, d, generator=g, dtype=dtype))
    max_blocks = max(len(t) for t in tables)
    block_tables = torch.tensor(
        [t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32
    )
    context_lens = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    qsl = torch.tensor(
        [0] + list(torch.tensor([q for _, q in seqs]).cumsum(0).tolist()), dtype=torch.int32
    )
    return k_cache, v_cache, block_tables, context_lens, qsl, dense, torch.cat(queries)


def _expected(seqs, dense, query, scale):
    outs, row = [], 0
    for (_ctx, q), (k, v) in zip(seqs, dense, strict=True):
        outs.append(reference_attention(query[row : row + q], k, v, scale))
        row += q
    return torch.cat(outs)


def test_write_kv_cache_places_each_token_at_its_slot():
    k_cache = torch.zeros(4, 3, 2, 5)
    v_cache = torch.zeros(4, 3, 2, 5)
    key = torch.randn(5, 2, 5)
    value = torch.randn(5, 2, 5)
    slots = torch.tensor([7, 0, 11, 3, 4])
    write_kv_cache(key, value, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        assert torch.equal(k_cache[s // 3, s % 3], key[t])
        assert torch.equal(v_cache[s // 3, s % 3], value[t])
    assert k_cache.view(-1, 2, 5)[[1, 2, 5, 6, 8, 9, 10]].abs().sum() == 0


def test_write_kv_cache_rejects_mismatched_slot_mapping():
    k_cache = torch.zeros(2, 4, 1, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(
            torch.zeros(3, 1, 8),
            torch.zeros(3, 1, 8),
            k_cache,
            k_cache.clone(),
            torch.tensor([0, 1]),
        )


def test_swap_blocks_copies_listed_blocks_only():
    src = torch.randn(6, 4, 2, 3)
    dst = torch.zeros(3, 4, 2, 3)
    swap_blocks(src, dst, [(5, 0), (2, 2)])
    assert torch.equal(dst[0], src[5])
    assert torch.equal(dst[2], src[2])
    assert dst[1].abs().sum() == 0
    back = torch.zeros_like(src)
    swap_blocks(dst, back, torch.tensor([[0, 1]]))
    assert torch.equal(back[1], src[5])
    swap_blocks(src, dst, [])  # no-op


def test_reference_attention_matches_sdpa_for_full_causal():
    q = torch.randn(7, 4, 16)
    k = torch.randn(7, 2, 16)
    v = torch.randn(7, 2, 16)
    ref = reference_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (9, 3)])
def test_paged_attention_decode_batch_matches_reference(block_size, hq, hkv, decode_path):
    seqs = [(ctx, 1) for ctx in (1, 5, 17, 33, 64, 3)]
    d = 32
    args = _setup_batch(seqs, hq, hkv, d, block_size, num_blocks=200 // block_size + 64)
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    scale = 1 / math.sqrt(d)
    out = paged_attention(query, k_cache, v_cache, bt, cl, qsl, scale)
    torch.testing.assert_close(out, _expected(seqs, dense, query, scale), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_paged_attention_prefill_matches_reference(block_size):
    seqs = [(13, 13), (40, 40), (2, 2)]
    args = _setup_batch(seqs, 8, 2, 16, block_size, num_blocks=64 // block_size * 2 + 64)
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    out = paged_attention(query, k_cache, v_cache, bt, cl, qsl, 0.25)
    torch.testing.assert_close(out, _expected(seqs, dense, query, 0.25), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_chunked_prefill_queries_are_the_tail_of_the_context(
    block_size, decode_path
):
    seqs = [(50, 7), (33, 16), (20, 19)]
    args = _setup_batch(seqs, 6, 3, 16, block_size, num_blocks=128)
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    out = paged_attention(query, k_cache, v_cache, bt, cl, qsl, 0.3)
    torch.testing.assert_close(out, _expected(seqs, dense, query, 0.3), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_paged_attention_mixed_prefill_and_decode_in_random_order(seed, decode_path):
    rng = random.Random(seed)
    seqs = []
    for _ in range(rng.randint(2, 9)):
        ctx = rng.randint(1, 70)
        q = rng.choice([1, 1, ctx, rng.randint(1, ctx)])
        seqs.append((ctx, q))
    hkv = rng.choice([1, 2, 4])
    hq = hkv * rng.choice([1, 2, 3])
    d = rng.choice([8, 16, 64])
    bs = rng.choice([1, 2, 16])
    args = _setup_batch(
        seqs, hq, hkv, d, bs, num_blocks=sum(-(-c // bs) for c, _ in seqs) + 8, seed=seed
    )
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    scale = 1 / math.sqrt(d)
    out = paged_attention(query, k_cache, v_cache, bt, cl, qsl, scale)
    torch.testing.assert_close(out, _expected(seqs, dense, query, scale), atol=3e-5, rtol=1e-4)


def test_paged_attention_with_prebuilt_plan_matches_per_call_plan(decode_path):
    seqs = [(9, 1), (30, 4), (12, 1), (5, 5)]
    k_cache, v_cache, bt, cl, qsl, dense, query = _setup_batch(seqs, 4, 2, 16, 4, num_blocks=32)
    q_lens = [q for _, q in seqs]
    plan = PagedAttentionPlan.build(bt.tolist(), cl.tolist(), q_lens, 4)
    a = paged_attention(query, k_cache, v_cache, None, None, None, 0.25, plan=plan)
    b = paged_attention(query, k_cache, v_cache, bt, cl, qsl, 0.25)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, _expected(seqs, dense, query, 0.25), atol=2e-5, rtol=1e-4)


def test_paged_attention_bfloat16_close_to_reference(decode_path):
    seqs = [(20, 1), (17, 17), (40, 3)]
    args = _setup_batch(seqs, 8, 2, 32, 16, num_blocks=16, dtype=torch.bfloat16)
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    out = paged_attention(query, k_cache, v_cache, bt, cl, qsl, 1 / math.sqrt(32))
    exp = _expected(seqs, dense, query, 1 / math.sqrt(32))
    torch.testing.assert_close(out.float(), exp.float(), atol=2e-2, rtol=2e-2)


def test_plan_rejects_query_longer_than_context():
    with pytest.raises(ValueError, match="query length 5"):
        PagedAttentionPlan.build([[0]], [3], [5], 16)


def test_plan_rejects_short_block_table():
    with pytest.raises(ValueError, match="needs 3 blocks"):
        PagedAttentionPlan.build([[0, 1]], [33], [1], 16)


@pytest.mark.parametrize("chunk_tokens", [1, 40, 100, 10_000])
def test_decode_chunks_and_reused_workspace_match_reference(chunk_tokens):
    """Decode rows attended in several chunks (some not consecutive in the batch), gathering
    into one workspace reused across calls and layers."""
    seqs = [(9, 1), (30, 4), (12, 1), (70, 1), (3, 1), (5, 5), (33, 1), (1, 1)]
    k_cache, v_cache, bt, cl, qsl, dense, query = _setup_batch(seqs, 6, 2, 16, 4, num_blocks=64)
    ws = AttentionWorkspace()
    plan = PagedAttentionPlan.build(
        bt.tolist(),
        cl.tolist(),
        [q for _, q in seqs],
        4,
        workspace=ws,
        decode_chunk_tokens=chunk_tokens,
        use_cpu_kernel=False,
    )
    expect = _expected(seqs, dense, query, 0.25)
    for _ in range(2):  # the second call reuses the workspace buffers
        out = paged_attention(query, k_cache, v_cache, None, None, None, 0.25, plan=plan)
        torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    if chunk_tokens == 1:
        assert len(plan.decode_chunks) == 6  # one decode sequence per chunk


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_decode_kernel_reads_strided_queries_and_long_contexts(monkeypatch, dtype, threads):
    """As the model calls it: q is a view into the fused qkv output (row stride > Hq * D),
    contexts span many blocks, one sequence's rows sit between prefill rows. With 1 thread
    the kernel takes a whole sequence per work item, with 4 one kv head per item."""
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_strided_long_context_decode(dtype)
    finally:
        torch.set_num_threads(before)


def _check_strided_long_context_decode(dtype):
    seqs = [(1000, 1), (37, 37), (1, 1), (513, 1), (64, 1)]
    hq, hkv, d = 9, 3, 64
    args = _setup_batch(seqs, hq, hkv, d, 16, num_blocks=120, seed=3, dtype=dtype)
    k_cache, v_cache, bt, cl, qsl, dense, query = args
    fused = torch.randn(query.shape[0], hq + 2 * hkv, d, dtype=dtype)
    fused[:, :hq] = query
    strided = fused[:, :hq]
    assert not strided.is_contiguous()
    plan = PagedAttentionPlan.build(bt.tolist(), cl.tolist(), [q for _, q in seqs], 16)
    assert plan.decode_batch is not None and not plan.decode_batch.all_rows
    out = paged_attention(strided, k_cache, v_cache, None, None, None, 0.125, plan=plan)
    exp = _expected(seqs, dense, query, 0.125)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exp, atol=2e-5, rtol=1e-4)
    else:
        torch.testing.assert_close(out.float(), exp.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
@pytest.mark.parametrize(
    "d,hkv,group", [(64, 3, 3), (64, 1, 7), (128, 2, 4), (64, 2, 8), (64, 1, 9), (48, 2, 2)]
)
def test_cpu_decode_kernel_head_shapes_match_reference(
    monkeypatch, d, hkv, group, block_size, threads
):
    """The kernel's float32 fast path (head dim 64 or 128, GQA group 1-8: scores of a chunk of
    tokens summed in one transpose, value sums kept in registers) and its generic path (group
    9, head dim 48), over contexts shorter than, equal to and longer than a vector's width
    and a block. Rows are written out of order into a strided output; the rows the kernel is
    not given stay untouched."""
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "1")
    assert cpu_kernels.available()
    seqs = [(ctx, 1) for ctx in (1, 15, 16, 17, 100, 257)]
    hq = hkv * group
    nb = sum(-(-c // block_size) for c, _ in seqs) + 4
    k_cache, v_cache, bt, cl, _, dense, query = _setup_batch(
        seqs, hq, hkv, d, block_size, num_blocks=nb, seed=block_size + d
    )
    n = len(seqs)
    rows = torch.tensor([2 * i + 1 for i in reversed(range(n))], dtype=torch.int64)
    q_rows = torch.zeros(2 * n + 1, hq + 2 * hkv, d)
    q_rows[rows, :hq] = query
    out = torch.full((2 * n + 1, hq + 1, d), 7.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_kernels.paged_decode_attention(
            q_rows[:, :hq], k_cache, v_cache, bt, cl, rows, 1 / math.sqrt(d), out[:, :hq]
        )
    finally:
        torch.set_num_threads(before)
    exp = _expected(seqs, dense, query, 1 / math.sqrt(d))
    torch.testing.assert_close(out[rows, :hq], exp, atol=2e-5, rtol=1e-4)
    untouched = torch.ones(2 * n + 1, dtype=torch.bool)
    untouched[rows] = False
    assert (out[untouched] == 7.0).all() and (out[:, hq] == 7.0).all()


def test_cpu_kernels_avx2_build_matches_reference(monkeypatch):
    """The AVX2 code paths (8-wide vectors and their own transpose-and-add), which an
    AVX-512 machine never runs by default: built under ATen's `ATEN_CPU_CAPABILITY=avx2`
    cap, and the kernel tests run against the references in a child process."""
    if "avx2" not in cpu_kernels._cpu_flags().split():
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert "-DCPU_CAPABILITY_AVX2" in cpu_kernels._vector_isa_flags(cpu_kernels._cpu_flags())
    tests = Path(__file__).parent
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(tests / "test_kernels.py"), str(tests / "test_cpu_fused_ops.py"),
         "-k", "head_shapes or strided_queries or fused or rotary or silu"],
        env={**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "RAYFLEET_CPU_KERNELS": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]


def test_cpu_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    plan = PagedAttentionPlan.build([[0]], [3], [1], 16)
    assert plan.decode_batch is None and len(plan.decode_chunks) == 1
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="RAYFLEET_CPU_KERNELS"):
        cpu_kernels.available()


def test_workspace_grows_and_is_reused():
    ws = AttentionWorkspace()
    like = torch.zeros(1)
    a = ws.get("k", (2, 3), like)
    b = ws.get("k", (1, 3), like)
    assert b.data_ptr() == a.data_ptr()
    c = ws.get("k", (4, 4), like)
    assert c.shape == (4, 4)
