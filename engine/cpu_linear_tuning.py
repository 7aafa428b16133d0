"""Which row counts a CPU projection sends to its oneDNN-prepacked weight and which to BLAS,
measured on the machine when the model loads.

Why measure: the answer depends on the CPU. On one 2-core box the packed copy won only at
8-32 rows (0.90-0.96x of BLAS at 1-4); on a 2-core AMD EPYC (AVX-512) box it ran batch-1
decode of the default model in 15.5 ms a step against BLAS's 27.5 (2 threads). A fixed table
leaves one of them 1.8x slow or 5-10% slow. Measuring costs about a second at load.

How: for each bucket of row counts (1, 2, 4, ... 512), run the decoder projections of the
first few layers (enough that their weights stream from memory, as in a real step) and,
separately, the LM head, both ways, several times, and keep the best time of each. The
packed copy takes a bucket when it is faster by a margin; a row count between buckets
follows the next bucket up, and one past the last bucket (a long prefill chunk, compute-bound
like the last bucket) follows the last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .models.embedding import ParallelLMHead
from .models.linear import PackedRows, _ParallelLinearBase

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The packed copy must be this much faster to take a bucket: below it, timing noise decides.
MARGIN = 0.03
# Decoder weights timed per pass: enough to stream from memory (past a 32 MiB L3) as a step
# does, and no more: calibration is part of every engine's load.
LAYER_SAMPLE_BYTES = 48 << 20
# Best of this many timed passes per bucket and way; compute-bound buckets (over 64 rows)
# vary little, and one pass after the warm-up does.
REPEATS = 3
LM_HEAD_BUCKETS = BUCKETS[:-1]  # its rows: sequences sampled, or 256 prompt-logprob rows


@dataclass(frozen=True, slots=True)
class BucketTiming:
    rows: int
    blas_s: float
    packed_s: float


@dataclass(frozen=True, slots=True)
class PackedRowsChoice:
    """The measured tables, and the timings they came from (logged at load)."""

    layers: PackedRows | None  # None: no decoder projection has a packed copy
    lm_head: PackedRows | None
    layer_timings: list[BucketTiming] = field(default_factory=list)
    lm_head_timings: list[BucketTiming] = field(default_factory=list)
    seconds: float = 0.0


def table_from_timings(timings: Sequence[BucketTiming], margin: float = MARGIN) -> PackedRows:
    """Row-count table: n rows use the packed copy where the smallest bucket >= n was faster
    packed (by `margin`); past the largest bucket, as the largest (`models.linear.cpu_linear`)."""
    wins = sorted((t.rows, t.packed_s < (1.0 - margin) * t.blas_s) for t in timings)
    if not wins:
        return ()
    table = [False] * (wins[-1][0] + 1)
    lo = 1
    for rows, packed in wins:
        for n in range(lo, rows + 1):
            table[n] = packed
        lo = rows + 1
    return tuple(table)


def _time_bucket(mods: Sequence[torch.nn.Module], rows: int, repeats: int) -> BucketTiming:
    xs = [torch.randn(rows, m.weight.shape[1], dtype=m.weight.dtype) for m in mods]
    packed_op = torch.ops.mkldnn._linear_pointwise

    def blas() -> None:
        for m, x in zip(mods, xs, strict=True):
            F.linear(x, m.weight, None)

    def packed() -> None:
        for m, x in zip(mods, xs, strict=True):
            packed_op(x, m.packed_weight, None, "none", [], "")

    best = {blas: float("inf"), packed: float("inf")}
    with torch.inference_mode():
        blas()  # warm both paths (oneDNN builds its primitive for this shape on first use)
        packed()
        for _ in range(repeats if rows <= 64 else 1):
            for fn in (blas, packed):  # interleaved: drift hits both alike
                t0 = time.perf_counter()
                fn()
                best[fn] = min(best[fn], time.perf_counter() - t0)
    return BucketTiming(rows, best[blas], best[packed])


def _packed_projections(model: torch.nn.Module) -> Iterator[tuple[bool, torch.nn.Module]]:
    """(is the LM head, module) for every projection that has a packed copy."""
    for m in model.modules():
        if getattr(m, "packed_weight", None) is None:
            continue
        if isinstance(m, ParallelLMHead):
            yield True, m
        elif isinstance(m, _ParallelLinearBase):
            yield False, m


def measure_packed_rows(
    model: torch.nn.Module,
    buckets: Sequence[int] = BUCKETS,
    repeats: int = REPEATS,
    layer_sample_bytes: int = LAYER_SAMPLE_BYTES,
) -> PackedRowsChoice:
    """Time every bucket both ways on `model`'s packed projections and build the tables."""
    t0 = time.perf_counter()
    layers: list[torch.nn.Module] = []
    heads: list[torch.nn.Module] = []
    sampled = 0
    for is_head, m in _packed_projections(model):
        if is_head:
            heads.append(m)
        elif sampled < layer_sample_bytes:
            layers.append(m)
            sampled += m.weight.numel() * m.weight.element_size()
    layer_t = [_time_bucket(layers, r, repeats) for r in buckets] if layers else []
    head_buckets = [r for r in buckets if r <= LM_HEAD_BUCKETS[-1]]
    head_t = [_time_bucket(heads, r, repeats) for r in head_buckets] if heads else []
    return PackedRowsChoice(
        layers=table_from_timings(layer_t) if layers else None,
        lm_head=table_from_timings(head_t) if heads else None,
        layer_timings=layer_t,
        lm_head_timings=head_t,
        seconds=time.perf_counter() - t0,
    )


def apply_packed_rows(model: torch.nn.Module, choice: PackedRowsChoice) -> None:
    for is_head, m in _packed_projections(model):
        table = choice.lm_head if is_head else choice.layers
        if table is not None:
            m.packed_rows = table


def describe(choice: PackedRowsChoice) -> str:
    """One log line: per bucket, BLAS / packed in ms and which one won."""

    def part(name: str, timings: list[BucketTiming], table: PackedRows | None) -> str:
        if table is None:
            return f"{name}: none"
        cells = [
            f"{t.rows}:{t.blas_s * 1e3:.2f}/{t.packed_s * 1e3:.2f}"
            + ("*" if t.rows < len(table) and table[t.rows] else "")
            for t in timings
        ]
        return f"{name} " + " ".join(cells)

    return (
        f"CPU linear rows (BLAS/packed ms, * = packed) in {choice.seconds:.2f} s: "
        f"{part('layers', choice.layer_timings, choice.layers)}; "
        f"{part('lm_head', choice.lm_head_timings, choice.lm_head)}"
    )
