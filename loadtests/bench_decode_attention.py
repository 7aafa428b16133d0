"""Micro-benchmark: paged decode attention for one engine step, all layers, on the CPU.

The shape of the engine benchmark's busiest decode steps on the default model: `--seqs`
sequences of `--min-ctx`..`--max-ctx` tokens, `--layers` layers of 9 query / 3 kv heads of
64 (SmolLM2-135M), float32, 16-token blocks. Each layer has its own K/V pool sized like the
default 1 GiB KV budget, and every sequence's blocks are drawn at random from it, as after
a while of serving ("cold": the step's K/V come from memory). "hot" maps every block onto
8 per layer, so the same work runs from the caches: what is left is arithmetic.

Three ways, interleaved, medians of `--iters`:
- `cpu-kernel`: the C++ kernel the engine uses (kernels/csrc/paged_decode_attention.cpp);
- `reference`: the PyTorch path (gather each sequence's blocks, then SDPA), the engine's
  path where the kernel cannot be built;
- `torch.sum floor`: one streaming read of as many bytes of the same pools, i.e. roughly
  what reading K and V costs on this machine (the same read in both modes: it is the
  cold figure's floor).

    python -m rayfleet.loadtests.bench_decode_attention          # ~1 min on 2 cores

Prints a table, writes loadtests/results/decode_attention-cpu.json (`--output`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from rayfleet.kernels import cpu_kernels
from rayfleet.kernels.attention import PagedAttentionPlan, paged_attention
from rayfleet.loadtests.report import save_result

HQ, HKV, D, BS = 9, 3, 64, 16


def _setup(args: argparse.Namespace, hot: bool):
    g = torch.Generator().manual_seed(args.seed)
    lens = torch.randint(args.min_ctx, args.max_ctx + 1, (args.seqs,), generator=g)
    max_blocks = int((lens.max() + BS - 1) // BS)
    per_token = 2 * HKV * D * 4 * args.layers
    num_blocks = max(args.kv_bytes // (per_token * BS), args.seqs * max_blocks)
    tables = torch.randperm(num_blocks, generator=g)[: args.seqs * max_blocks]
    if hot:
        tables = tables % 8
    tables = tables.view(args.seqs, max_blocks).to(torch.int32).contiguous()
    caches = [
        (torch.randn(num_blocks, BS, HKV, D, generator=g), torch.randn(num_blocks, BS, HKV, D))
        for _ in range(args.layers)
    ]
    query = torch.randn(args.seqs, HQ, D, generator=g)
    return lens.to(torch.int32), tables, caches, query


def _time(fn, iters: int) -> list[float]:
    fn()  # warm: the plan, the workspace, the first touch of the pools
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def run(args: argparse.Namespace) -> dict:
    if not cpu_kernels.available():
        raise SystemExit("the C++ CPU kernels did not build here: nothing to compare")
    res: dict = {
        "shape": {"seqs": args.seqs, "ctx": [args.min_ctx, args.max_ctx], "layers": args.layers,
                  "heads": [HQ, HKV], "head_dim": D, "block_size": BS, "dtype": "float32"},
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "iters": args.iters,
    }  # fmt: skip
    for mode in ("cold", "hot"):
        res[mode] = _measure(args, hot=mode == "hot")
    return res


def _measure(args: argparse.Namespace, hot: bool) -> dict:
    lens, tables, caches, query = _setup(args, hot)
    n = args.seqs
    rows = torch.arange(n, dtype=torch.int64)
    out = torch.empty_like(query)
    scale = D**-0.5
    kv_bytes = int(lens.sum()) * HKV * D * 4 * 2 * args.layers
    plan = PagedAttentionPlan.build(tables.tolist(), lens.tolist(), [1] * n, BS,
                                    use_cpu_kernel=False)  # fmt: skip
    floor_blocks = int(lens.sum()) // BS

    def kernel():
        for k, v in caches:
            cpu_kernels.paged_decode_attention(query, k, v, tables, lens, rows, scale, out)

    def reference():
        for k, v in caches:
            paged_attention(query, k, v, None, None, None, scale, plan=plan)

    def floor():
        for k, v in caches:
            k[:floor_blocks].sum()
            v[:floor_blocks].sum()

    ways = {"cpu-kernel": kernel, "reference": reference, "torch.sum floor": floor}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(args.rounds):  # interleaved, so drift hits every way alike
        for w, fn in ways.items():
            times[w] += _time(fn, args.iters)
    return {
        "kv_bytes": kv_bytes,
        **{
            w: {"median_ms": statistics.median(t), "min_ms": min(t),
                "gb_per_s": kv_bytes / statistics.median(t) / 1e6}
            for w, t in times.items()
        },
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--min-ctx", type=int, default=150)
    p.add_argument("--max-ctx", type=int, default=350)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-bytes", type=int, default=1 << 30, help="all layers' K/V pools")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-dir", default="loadtests/results")
    p.add_argument("--output", default="decode_attention-cpu.json")
    args = p.parse_args(argv)
    res = run(args)
    print(
        f"{args.seqs} sequences x {args.min_ctx}-{args.max_ctx} tokens, {args.layers} layers, "
        f"{HQ}/{HKV} heads of {D}, float32, {res['threads']} threads "
        f"({res['cold']['kv_bytes'] / 1e6:.0f} MB of K/V per step)"
    )
    print(f"{'':<18}{'cold ms':>9}{'GB/s':>7}{'hot ms':>9}   (medians; ratio to cpu-kernel)")
    for w in ("cpu-kernel", "reference", "torch.sum floor"):
        c, h = res["cold"][w], res["hot"][w]
        ratio = c["median_ms"] / res["cold"]["cpu-kernel"]["median_ms"]
        print(f"{w:<18}{c['median_ms']:>9.1f}{c['gb_per_s']:>7.1f}{h['median_ms']:>9.1f}"
              f"   {ratio:.2f}x")  # fmt: skip
    print(f"wrote {save_result(args.result_dir, args.output, res)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
