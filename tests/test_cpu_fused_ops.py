"""The C++ fused layer ops (kernels/csrc/fused_layer_ops.cpp) against their PyTorch
composites: the exact sequences of ops the model runs when the kernels are off."""

from __future__ import annotations

import pytest
import torch
from rayfleet.kernels import cpu_kernels
from rayfleet.kernels.cache import write_kv_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _kernels(monkeypatch):
    monkeypatch.setenv("RAYFLEET_CPU_KERNELS", "1")  # a failed build is an error here
    assert cpu_kernels.available()


def _tol(dtype):
    # float32: only the order of the variance's sum differs; 16-bit: one rounding step.
    return dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 7, 64])
def test_fused_add_rms_norm_matches_add_then_norm(dtype, t):
    g = torch.Generator().manual_seed(t)
    h = 576
    x = torch.randn(t, h, generator=g).to(dtype)
    res = torch.randn(t, h, generator=g).to(dtype)
    w = (torch.rand(h, generator=g) + 0.5).to(dtype)
    want_res = res + x
    r32 = want_res.float()
    want = w * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    cpu_kernels.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(res, want_res)
    torch.testing.assert_close(x, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_cache_write_match_rotate_then_index_copy(dtype):
    from rayfleet.engine.models.rotary import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    hq, hkv, d, t, bs = 9, 3, 64, 11, 4
    rope = RotaryEmbedding(d, 256, {"rope_type": "default", "rope_theta": 10000.0}, dtype=dtype)
    qkv = torch.randn(t, hq + 2 * hkv, d, generator=g).to(dtype)
    positions = torch.randint(0, 256, (t,), generator=g)
    slots = torch.randperm(10 * bs, generator=g)[:t]
    kc = torch.zeros(10, bs, hkv, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    cos, sin = rope.cos_sin(positions)
    want_qk = rope.apply(qkv[:, : hq + hkv], cos, sin)
    want_kc, want_vc = kc.clone(), vc.clone()
    write_kv_cache(want_qk[:, hq:], qkv[:, hq + hkv :], want_kc, want_vc, slots)
    v_before = qkv[:, hq + hkv :].clone()
    cpu_kernels.rotary_embedding_and_cache(
        qkv, positions, rope.cos_cache, rope.sin_cache, kc, vc, slots, hq, hkv
    )
    torch.testing.assert_close(qkv[:, : hq + hkv], want_qk, **_tol(dtype))
    assert torch.equal(qkv[:, hq + hkv :], v_before)  # v is not rotated
    torch.testing.assert_close(kc, want_kc, **_tol(dtype))
    assert torch.equal(vc, want_vc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_composite(dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(5, 2 * 1536, generator=g) * 4).to(dtype)
    want = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(cpu_kernels.silu_and_mul(gate_up), want, **_tol(dtype))


def test_bad_shapes_are_refused_with_the_reason():
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match=r"weight must be \[H\]"):
        cpu_kernels.fused_add_rms_norm(x, torch.zeros(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match=r"gate_up must be \[T, 2 I\]"):
        torch.ops.rayfleet_cpu.silu_and_mul(torch.zeros(2, 5), torch.zeros(2, 2))
