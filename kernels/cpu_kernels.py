"""C++ CPU kernels (kernels/csrc), built on first use with the machine's C++ compiler.

The build goes into `$RAYFLEET_CACHE_DIR/kernels/<key>` (default `~/.cache/rayfleet`), where
the key hashes the sources, the torch and Python versions, the flags and the CPU's
instruction-set flags (the code is compiled for this CPU with `-march=native`, so a cache
shared between different machines must not hand one's build to the other). Concurrent
processes (several replicas starting at once) wait on torch's build lock.

`RAYFLEET_CPU_KERNELS`: `auto` (default) builds and uses them, falling back to the PyTorch
reference kernels with one warning when there is no compiler; `0` never uses them; `1`
requires them (a failed build raises).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = ("paged_decode_attention.cpp", "fused_layer_ops.cpp")
_HEADERS = ("vec_math.h",)
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")
_ENV = "RAYFLEET_CPU_KERNELS"

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str


def _mode() -> str:
    mode = os.environ.get(_ENV, "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"{_ENV} must be auto, 0 or 1, got {mode!r}")
    return mode


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _vector_isa_flags(cpu_flags: str) -> list[str]:
    """ATen's `Vectorized` picks its width from CPU_CAPABILITY_* macros, which PyTorch's own
    build sets per kernel file; an extension must set them itself. AVX-512 as ATen needs it
    (F, BW, VL, DQ), else AVX2 with FMA, else ATen's portable fallback (which torch 2.13's
    headers fail to compile for float reductions: such a machine gets the PyTorch
    reference kernels). ATen's own switch `ATEN_CPU_CAPABILITY=avx2` caps the width at
    AVX2, as it does for PyTorch's kernels, so that path can be built and tested on an
    AVX-512 machine."""
    flags = set(cpu_flags.split())
    avx2_cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "avx2"
    if not avx2_cap and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _build_dir(key: str) -> Path:
    root = Path(os.environ.get("RAYFLEET_CACHE_DIR") or Path.home() / ".cache" / "rayfleet")
    path = root / "kernels" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build() -> None:
    from torch.utils import cpp_extension

    try:  # the `ninja` wheel's binary, even when the venv's bin/ is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / s for s in _SOURCES]
    cflags = [*_CFLAGS, *_vector_isa_flags(_cpu_flags())]
    h = hashlib.sha256()
    for s in [*sources, *(src_dir / f for f in _HEADERS)]:
        h.update(s.read_bytes())
    for part in (torch.__version__, sys.version, " ".join(cflags), _cpu_flags()):
        h.update(part.encode())
    key = h.hexdigest()[:16]
    cpp_extension.load(
        name=f"rayfleet_cpu_{key}",
        sources=[str(s) for s in sources],
        build_directory=str(_build_dir(key)),
        extra_cflags=cflags,
        extra_include_paths=[str(src_dir)],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Whether the C++ CPU kernels are loaded (building them on the first call)."""
    mode = _mode()
    if mode == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                _build()
                _state["ok"] = True
            except Exception as e:  # no compiler, no headers, a failed build
                _state["ok"] = False
                _state["error"] = f"{type(e).__name__}: {e}"
                if mode == "1":
                    raise RuntimeError(
                        f"{_ENV}=1 but the C++ CPU kernels could not be built: {_state['error']}"
                    ) from e
                logger.warning(
                    "C++ CPU kernels unavailable (%s); using the PyTorch reference kernels",
                    str(_state["error"]).splitlines()[0][:300],
                )
        return bool(_state["ok"])


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """For each sequence s: `out[rows[s]] = attention(query[rows[s]], its cached K/V)`.

    query/out `[T, Hq, D]`; caches `[num_blocks, block_size, Hkv, D]` contiguous;
    block_tables `[n, max_blocks]` int32; context_lens `[n]` int32; rows `[n]` int64.
    Call only when `available()`."""
    torch.ops.rayfleet_cpu.paged_decode_attention(
        query, k_cache, v_cache, block_tables, context_lens, rows, scale, out
    )


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """In place: `residual += x`, then `x = rms_norm(residual) * weight` (`[T, H]`)."""
    torch.ops.rayfleet_cpu.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin_signed: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """Rotate q and k of `qkv[T, Hq + 2 Hkv, D]` in place (tables `[max_position, D]`, the
    sin table signed as in `RotaryEmbedding`), then store k and v at `slots[T]`."""
    torch.ops.rayfleet_cpu.rotary_embedding_and_cache(
        qkv, positions, cos, sin_signed, k_cache, v_cache, slots, num_heads, num_kv_heads
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate_up[:, :I]) * gate_up[:, I:]` for `gate_up[T, 2 I]`."""
    out = torch.empty(
        gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype, device=gate_up.device
    )
    torch.ops.rayfleet_cpu.silu_and_mul(gate_up, out)
    return out
