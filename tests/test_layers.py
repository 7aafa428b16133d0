"""Tensor-parallel layers, RMSNorm and rotary embedding against full tensors and transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rayfleet.engine.models.embedding import ParallelLMHead, VocabParallelEmbedding
from rayfleet.engine.models.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    pack_for_cpu,
    rows_between,
)
from rayfleet.engine.models.norm import RMSNorm
from rayfleet.engine.models.rotary import (
    RotaryEmbedding,
    compute_inv_freq,
    rope_parameters_from_config,
)


def _load(layer, full, shard_id=None, param="weight"):
    p = getattr(layer, param)
    p.weight_loader(p, full, shard_id)
    return p.data


def test_column_parallel_shards_concatenate_to_full_weight():
    w, b = torch.randn(12, 5), torch.randn(12)
    shards = []
    for rank in range(2):
        layer = ColumnParallelLinear(5, 12, bias=True, tp_rank=rank, tp_size=2)
        shards.append((_load(layer, w).clone(), _load(layer, b, param="bias").clone()))
    assert torch.equal(torch.cat([s[0] for s in shards]), w)
    assert torch.equal(torch.cat([s[1] for s in shards]), b)


def test_column_parallel_tp1_forward_is_linear():
    w, x = torch.randn(6, 4), torch.randn(3, 4)
    layer = ColumnParallelLinear(4, 6)
    _load(layer, w)
    torch.testing.assert_close(layer(x), x @ w.T)


def test_merged_column_parallel_gate_up_shards():
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    for rank in range(2):
        layer = MergedColumnParallelLinear(3, [8, 8], tp_rank=rank, tp_size=2)
        _load(layer, gate, 0)
        _load(layer, up, 1)
        expect = torch.cat([gate[rank * 4 : rank * 4 + 4], up[rank * 4 : rank * 4 + 4]])
        assert torch.equal(layer.weight.data, expect)
    fused = MergedColumnParallelLinear(3, [8, 8], tp_rank=1, tp_size=2)
    _load(fused, torch.cat([gate, up]))  # an already-merged checkpoint tensor
    assert torch.equal(fused.weight.data, expect)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_qkv_parallel_shards_for_gqa(num_kv_heads):
    d, hq, hidden, tp = 3, 4, 7, 2
    q, k, v = (
        torch.randn(hq * d, hidden),
        torch.randn(num_kv_heads * d, hidden),
        torch.randn(num_kv_heads * d, hidden),
    )
    qs, ks, vs = [], [], []
    for rank in range(tp):
        layer = QKVParallelLinear(hidden, d, hq, num_kv_heads, tp_rank=rank, tp_size=tp)
        for sid, t in (("q", q), ("k", k), ("v", v)):
            _load(layer, t, sid)
        w = layer.weight.data
        qs.append(w[: layer.q_size])
        ks.append(w[layer.q_size : layer.q_size + layer.kv_size])
        vs.append(w[layer.q_size + layer.kv_size :])
    assert torch.equal(torch.cat(qs), q)
    if num_kv_heads >= tp:
        assert torch.equal(torch.cat(ks), k) and torch.equal(torch.cat(vs), v)
    else:  # one kv head replicated on both ranks
        assert torch.equal(ks[0], k) and torch.equal(ks[1], k) and torch.equal(vs[1], v)


def test_qkv_tp1_forward_equals_separate_projections():
    d, hidden = 4, 8
    q, k, v = torch.randn(16, hidden), torch.randn(8, hidden), torch.randn(8, hidden)
    bq, bk, bv = torch.randn(16), torch.randn(8), torch.randn(8)
    layer = QKVParallelLinear(hidden, d, 4, 2, bias=True)
    for sid, w, b in (("q", q, bq), ("k", k, bk), ("v", v, bv)):
        _load(layer, w, sid)
        _load(layer, b, sid, param="bias")
    x = torch.randn(5, hidden)
    expect = torch.cat([F.linear(x, q, bq), F.linear(x, k, bk), F.linear(x, v, bv)], dim=-1)
    torch.testing.assert_close(layer(x), expect)


def test_row_parallel_partial_products_sum_to_full_output():
    w, b, x = torch.randn(6, 10), torch.randn(6), torch.randn(3, 10)
    shards, partial = [], torch.zeros(3, 6)
    for rank in range(2):
        layer = RowParallelLinear(10, 6, bias=True, tp_rank=rank, tp_size=2)
        shards.append(_load(layer, w).clone())
        assert torch.equal(_load(layer, b, param="bias"), b)  # bias replicated, added once
        partial += F.linear(x[:, rank * 5 : rank * 5 + 5], layer.weight)
    assert torch.equal(torch.cat(shards, dim=1), w)
    torch.testing.assert_close(partial + b, F.linear(x, w, b))


def test_vocab_parallel_embedding_shards_pad_uneven_vocab():
    w = torch.randn(11, 4)
    shards = []
    for rank in range(2):
        emb = VocabParallelEmbedding(11, 4, tp_rank=rank, tp_size=2)
        shards.append(_load(emb, w).clone())
    assert shards[1].shape == (6, 4) and shards[1][5].abs().sum() == 0  # padding row
    assert torch.equal(torch.cat(shards)[:11], w)


def test_lm_head_tied_shares_the_embedding_weight():
    emb = VocabParallelEmbedding(9, 4)
    head = ParallelLMHead(9, 4)
    head.tie(emb)
    w = torch.randn(9, 4)
    _load(emb, w)
    h = torch.randn(2, 4)
    out = head(h)
    assert out.dtype == torch.float32 and out.shape == (2, 9)
    torch.testing.assert_close(out, h @ w.T)


def test_wrong_shapes_raise_value_error():
    layer = ColumnParallelLinear(4, 6)
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(layer, torch.randn(6, 5))
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(4, 7, tp_size=2)
    with pytest.raises(ValueError, match="shard_id"):
        _load(QKVParallelLinear(4, 2, 2, 2), torch.randn(4, 4), "x")


def test_rmsnorm_matches_transformers_and_fuses_residual():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    w = torch.randn(16)
    ours = RMSNorm(16, eps=1e-5)
    ours.weight.data.copy_(w)
    ref = LlamaRMSNorm(16, eps=1e-5)
    ref.weight.data.copy_(w)
    x, r = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.equal(ours(x), ref(x))
    normed, new_res = ours(x, r)
    assert torch.equal(new_res, x + r)
    assert torch.equal(normed, ref(x + r))


def _llama_config(**rope):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128,
        num_attention_heads=2,
        max_position_embeddings=4096,
        rope_parameters=rope or None,
    )


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "default", "rope_theta": 500000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_inv_freq_matches_transformers_rope_init(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = _llama_config(**rope)
    if rope["rope_type"] == "default":
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    ours = compute_inv_freq(64, rope_parameters_from_config(cfg))
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)


def test_legacy_rope_scaling_attribute_is_read():
    class Legacy:  # an old-style config object: rope_scaling + rope_theta attributes
        rope_scaling = {"type": "linear", "factor": 2.0}
        rope_theta = 1000.0
        max_position_embeddings = 128

    params = rope_parameters_from_config(Legacy())
    assert params["rope_type"] == "linear" and params["rope_theta"] == 1000.0


def test_unknown_rope_type_lists_supported():
    with pytest.raises(ValueError, match="yarn.*supported: default, linear, llama3"):
        compute_inv_freq(8, {"rope_type": "yarn", "rope_theta": 1e4})


def test_rotary_apply_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = _llama_config(**rope)
    ours = RotaryEmbedding(64, 4096, rope_parameters_from_config(cfg))
    ref = LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([0, 1, 7, 100, 3000, 4095])
    q, k = torch.randn(6, 2, 64), torch.randn(6, 1, 64)
    cos, sin = ref(q, pos[None])
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    oq, ok = ours(pos, q, k)
    torch.testing.assert_close(oq, rq[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ok, rk[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


# ------------------------------------------- real tensor parallelism: 2 ranks over gloo


def _tp_worker(rank: int, world: int, store: str, folder: str, ids: list[int], out_file: str):
    import torch.distributed as dist
    from rayfleet.engine.model_loader import iterate_weights, load_hf_config
    from rayfleet.engine.models import MODEL_REGISTRY
    from rayfleet.engine.models.attention import AttentionMetadata
    from rayfleet.kernels.attention import PagedAttentionPlan

    torch.set_num_threads(1)
    # A file store: no TCP store server living in rank 0 (and no port picked by bind and
    # release, which another process can take in between).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = load_hf_config(folder)
        model = MODEL_REGISTRY[cfg.architectures[0]](
            cfg, torch.float32, "cpu", tp_rank=rank, tp_size=world
        )
        model.load_weights(iterate_weights(folder))
        layer0 = model.model.layers[0].self_attn
        caches = [
            (
                torch.zeros(8, 8, layer0.num_kv_heads, layer0.head_dim),
                torch.zeros(8, 8, layer0.num_kv_heads, layer0.head_dim),
            )
            for _ in model.model.layers
        ]
        t = len(ids)
        meta = AttentionMetadata(
            torch.arange(t), PagedAttentionPlan.build([list(range(8))], [t], [t], 8)
        )
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.tensor(ids), torch.arange(t), caches, meta))
        if rank == 0:
            torch.save(logits, out_file)
        # Neither rank tears down its gloo pairs while the other may still be using them: a
        # peer's socket closing under a live pair aborts the process (the likely cause of a
        # SIGABRT seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tensor_parallel_2_ranks_over_gloo_match_tp1_logits(tiny_model_factory, tmp_path, arch):
    import torch.multiprocessing as mp
    from rayfleet.engine.model_loader import iterate_weights, load_hf_config
    from rayfleet.engine.models import MODEL_REGISTRY
    from rayfleet.engine.models.attention import AttentionMetadata
    from rayfleet.kernels.attention import PagedAttentionPlan

    # vocab 383: uneven over 2 ranks (padding row); 2 kv heads: one per rank.
    folder = tiny_model_factory(arch, arch=arch, vocab_size=383)
    ids = [5, 17, 100, 382, 0, 42, 7, 9, 250, 33]
    out_file = str(tmp_path / "tp_logits.pt")
    mp.start_processes(
        _tp_worker,
        args=(2, str(tmp_path / "gloo_store"), str(folder), ids, out_file),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    cfg = load_hf_config(folder)
    model = MODEL_REGISTRY[cfg.architectures[0]](cfg, torch.float32, "cpu")
    model.load_weights(iterate_weights(folder))
    caches = [(torch.zeros(8, 8, 2, 16), torch.zeros(8, 8, 2, 16)) for _ in model.model.layers]
    t = len(ids)
    meta = AttentionMetadata(
        torch.arange(t), PagedAttentionPlan.build([list(range(8))], [t], [t], 8)
    )
    with torch.inference_mode():
        ref = model.compute_logits(model(torch.tensor(ids), torch.arange(t), caches, meta))
    got = torch.load(out_file)
    assert got.shape == ref.shape == (t, 383)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 16, 32, 33, 64, 65, 200])
def test_packed_linear_matches_blas_and_is_used_only_inside_its_row_range(rows):
    """The oneDNN-packed copy gives the same matmul (float32 rounding apart) and serves only
    the row counts in `packed_rows`; outside it the layer is exactly F.linear."""
    torch.manual_seed(rows)
    w, b, x = torch.randn(48, 40), torch.randn(48), torch.randn(rows, 40)
    layer = ColumnParallelLinear(40, 48, bias=True)
    _load(layer, w)
    _load(layer, b, param="bias")
    layer.packed_weight = pack_for_cpu(layer.weight)
    layer.packed_rows = rows_between(8, 33)
    got = layer(x)
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
    packed = torch.ops.mkldnn._linear_pointwise(x, layer.packed_weight, b, "none", [], "")
    assert torch.equal(got, packed if 8 <= rows < 33 else F.linear(x, w, b))
    # Past the table's end, its last entry decides (a measured table's largest bucket).
    layer.packed_rows = (False, True, True)
    assert torch.equal(layer(x), packed)


def test_packed_lm_head_matches_blas():
    torch.manual_seed(0)
    head = ParallelLMHead(300, 24)
    _load(head, torch.randn(300, 24))
    x = torch.randn(16, 24)
    ref = head(x)
    head.packed_weight = pack_for_cpu(head.weight)
    assert head.packed_rows[16]
    torch.testing.assert_close(head(x), ref, atol=1e-4, rtol=1e-5)
