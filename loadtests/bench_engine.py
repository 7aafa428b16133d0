"""`rayfleet bench engine`: the rayfleet engine against Hugging Face transformers
`generate` on the same model, in the same process, offline.

Scenarios (each repeated `--repeats` times, the two sides interleaved; medians reported):
- decode: one request; ms per generated token after the first, (T(n) - T(1)) / (n - 1),
  so prefill is out of it on both sides.
- throughput: N requests of `--input-len` / `--output-len` tokens; output tokens/s.
  rayfleet takes them all at once (continuous batching, `max_num_seqs = --batch-size`);
  transformers runs static batches of `--batch-size`.
- variable: N requests whose output lengths are drawn from `--min-output-len`..
  `--max-output-len`; a static batch runs until its longest request is done, and only the
  requested tokens count as output.
Lengths are forced on both sides (rayfleet: ignore_eos + min_tokens; transformers:
min_new_tokens = max_new_tokens). Prompts are the same token ids for both. Greedy.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from rayfleet.loadtests.arg_types import key_value_arg

SCENARIOS = ("decode", "throughput", "variable")


@dataclass
class EngineBenchConfig:
    num_requests: int = 64
    input_len: int = 128
    output_len: int = 128
    min_output_len: int = 16
    max_output_len: int = 256
    batch_size: int = 64
    repeats: int = 3
    seed: int = 0
    scenarios: tuple[str, ...] = SCENARIOS

    def validate(self) -> None:
        for name in ("num_requests", "input_len", "output_len", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_output_len <= self.max_output_len:
            raise ValueError(
                f"need 1 <= min_output_len <= max_output_len, got {self.min_output_len}..{self.max_output_len}"
            )
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise ValueError(f"unknown scenarios {bad}; choose from {SCENARIOS}")


# A side generates for a list of prompts (token ids) with per-request output lengths and
# returns (tokens produced per request, tokens generated in all, including waste).
GenerateFn = Callable[[list[list[int]], list[int]], tuple[list[int], int]]


class RayfleetSide:
    name = "rayfleet"

    def __init__(
        self,
        model: str | None,
        dtype: str,
        device: str,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        tokenizer: str | None = None,
        engine_overrides: dict | None = None,
    ):
        from rayfleet.engine import LLM

        kw = {"tokenizer": tokenizer} if tokenizer else {}
        kw.update(engine_overrides or {})
        self.llm = LLM(
            model=model,
            dtype=dtype,
            device=device,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            **kw,
        )

    def generate(self, prompts: list[list[int]], out_lens: list[int]) -> tuple[list[int], int]:
        from rayfleet.engine import SamplingParams

        params = [
            SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0)
            for n in out_lens
        ]
        arg = params[0] if len(set(out_lens)) == 1 else params
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], arg)
        got = [len(o.outputs[0].token_ids) for o in outs]
        return got, sum(got)


class HFSide:
    """transformers `generate`, static batches: each batch runs to its longest request."""

    name = "hf"

    def __init__(self, model_path: str, dtype: str, device: str, batch_size: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        torch_dtype = {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }.get(dtype, torch.float32)
        p = Path(model_path)
        kw = {"dtype": torch_dtype}
        if p.suffix == ".gguf":
            self.model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, **kw)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(p), **kw)
        self.device = "cuda" if device == "cuda" else "cpu"
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        cfg = self.model.generation_config
        eos = cfg.eos_token_id
        self.pad_id = (
            cfg.pad_token_id
            if cfg.pad_token_id is not None
            else (eos[0] if isinstance(eos, list) else (eos if eos is not None else 0))
        )

    def generate(self, prompts: list[list[int]], out_lens: list[int]) -> tuple[list[int], int]:
        torch = self.torch
        got: list[int] = []
        generated = 0
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i : i + self.batch_size]
            lens = out_lens[i : i + self.batch_size]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):  # left padding, as decoder-only generate wants
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            n = max(lens)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                )
            new = out.shape[1] - width
            generated += new * len(batch)
            got.extend(min(new, k) for k in lens)
        return got, generated


def make_prompts(
    tokenizer, n: int, length: int, seed: int, vocab_size: int | None = None
) -> list[list[int]]:
    """`n` prompts of exactly `length` token ids: the tokenizer's word tokens, or (a model
    folder without a tokenizer) ids drawn below `vocab_size`."""
    if tokenizer is None:
        if not vocab_size:
            raise ValueError("no tokenizer and no vocab_size to draw token ids from")
        rng = random.Random(seed)
        return [[rng.randrange(vocab_size) for _ in range(length)] for _ in range(n)]
    from rayfleet.loadtests.workloads import TokenSource

    src = TokenSource(tokenizer, seed=seed)
    if vocab_size:
        src.pool = [i for i in src.pool if i < vocab_size] or list(range(vocab_size))
    return [src.sample(length) for _ in range(n)]


def _prompt_source(model_path: str, tokenizer_path: str | None):
    """(tokenizer or None, vocab size from config.json or None)."""
    import json

    from rayfleet.loadtests.workloads import load_tokenizer

    p = Path(model_path)
    vocab = None
    cfg = p / "config.json"
    if cfg.exists():
        vocab = json.loads(cfg.read_text()).get("vocab_size")
    has_tok = (
        tokenizer_path
        or p.suffix == ".gguf"
        or any(
            (p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        )
    )
    return (load_tokenizer(tokenizer_path or model_path) if has_tok else None), vocab


def _timed(fn: GenerateFn, prompts, lens) -> tuple[float, list[int], int]:
    t = time.perf_counter()
    got, generated = fn(prompts, lens)
    return time.perf_counter() - t, got, generated


def run_scenarios(
    sides: dict[str, GenerateFn],
    prompts: list[list[int]],
    cfg: EngineBenchConfig,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every scenario `repeats` times, sides interleaved; medians and ratios."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    var_lens = [
        rng.randint(cfg.min_output_len, cfg.max_output_len) for _ in range(cfg.num_requests)
    ]
    n = cfg.num_requests
    samples: dict[str, dict[str, list]] = {s: {name: [] for name in sides} for s in cfg.scenarios}
    lengths_ok: dict[str, bool] = {name: True for name in sides}
    for fn in sides.values():  # warm-up: first calls pay for allocation and compilation
        fn(prompts[:2], [4, 4])
    for rep in range(cfg.repeats):
        for scen in cfg.scenarios:
            for name, fn in sides.items():
                if scen == "decode":
                    t1, _, _ = _timed(fn, prompts[:1], [1])
                    tn, got, _ = _timed(fn, prompts[:1], [cfg.output_len])
                    ok = got == [cfg.output_len]
                    per_tok = (tn - t1) / max(1, cfg.output_len - 1)
                    samples[scen][name].append(
                        {"t1": t1, "tn": tn, "ms_per_token": per_tok * 1000.0}
                    )
                else:
                    lens = [cfg.output_len] * n if scen == "throughput" else var_lens
                    el, got, generated = _timed(fn, prompts[:n], lens)
                    ok = got == lens
                    samples[scen][name].append(
                        {"elapsed": el, "useful": sum(got), "generated": generated}
                    )
                lengths_ok[name] &= ok
                log(f"  repeat {rep + 1}/{cfg.repeats} {scen:<10} {name:<9} done")
    doc: dict = {"lengths_ok": lengths_ok}
    names = list(sides)
    for scen in cfg.scenarios:
        entry: dict = {}
        for name in names:
            ss = samples[scen][name]
            if scen == "decode":
                entry[name] = {
                    "ms_per_token": statistics.median(s["ms_per_token"] for s in ss),
                    "first_token_latency_s": statistics.median(s["t1"] for s in ss),
                    "samples_ms_per_token": [s["ms_per_token"] for s in ss],
                }
            else:
                el = statistics.median(s["elapsed"] for s in ss)
                useful = ss[0]["useful"]
                total_in = n * cfg.input_len
                entry[name] = {  # `vllm bench throughput`'s keys, plus output-only rates
                    "elapsed_time": el,
                    "num_requests": n,
                    "total_num_tokens": total_in + useful,
                    "total_output_tokens": useful,
                    "generated_tokens": ss[0]["generated"],
                    "requests_per_second": n / el,
                    "tokens_per_second": (total_in + useful) / el,
                    "output_tokens_per_second": useful / el,
                    "samples_output_tokens_per_second": [s["useful"] / s["elapsed"] for s in ss],
                }
        # rayfleet over each other side: the ratio of the medians, and the median of the
        # per-repeat ratios (sides run back to back within a repeat, so this one is robust
        # to the machine drifting between repeats).
        for other, key in (("hf", "speedup"), ("baseline", "vs_baseline")):
            if "rayfleet" in entry and other in entry:
                entry[key], entry[f"paired_{key}"] = _ratios(
                    scen, samples[scen]["rayfleet"], samples[scen][other]
                )
        if scen == "decode":
            entry.update(input_len=cfg.input_len, output_len=cfg.output_len)
        else:
            entry.update(num_requests=n, input_len=cfg.input_len, batch_size=cfg.batch_size)
            if scen == "throughput":
                entry["output_len"] = cfg.output_len
            else:
                entry["output_len_range"] = [cfg.min_output_len, cfg.max_output_len]
                entry["output_lens"] = var_lens
        doc[scen] = entry
    return doc


def _ratios(scen: str, ours: list[dict], other: list[dict]) -> tuple[float, float]:
    """(ratio of medians, median of per-repeat ratios), >1 when rayfleet is faster."""
    if scen == "decode":
        per = [o["ms_per_token"] / r["ms_per_token"] for r, o in zip(ours, other, strict=True)]
        med = statistics.median(o["ms_per_token"] for o in other) / statistics.median(
            r["ms_per_token"] for r in ours
        )
    else:
        per = [o["elapsed"] / r["elapsed"] for r, o in zip(ours, other, strict=True)]
        med = statistics.median(o["elapsed"] for o in other) / statistics.median(
            r["elapsed"] for r in ours
        )
    return med, statistics.median(per)


def format_table(doc: dict) -> str:
    names = [k for k in ("rayfleet", "baseline", "hf") if k in doc.get("lengths_ok", {})]
    ratios = [k for k in ("speedup", "vs_baseline") if any(k in doc.get(s, {}) for s in SCENARIOS)]
    w = 46 + 12 * (len(names) + len(ratios))
    out = [
        " Engine benchmark (offline) ".center(w, "="),
        f"{'scenario':<34}"
        + "".join(f"{n:>12}" for n in names)
        + "".join(f"{r:>12}" for r in ratios),
    ]
    for scen, label, key, fmt in (
        ("decode", "batch-1 decode (ms/token)", "ms_per_token", ".2f"),
        ("throughput", "fixed lengths (output tok/s)", "output_tokens_per_second", ".1f"),
        ("variable", "variable lengths (output tok/s)", "output_tokens_per_second", ".1f"),
    ):
        if scen not in doc:
            continue
        e = doc[scen]
        if scen == "throughput":
            label = f"{e['num_requests']}x {e['input_len']} in/{e['output_len']} out (tok/s)"
        elif scen == "variable":
            lo, hi = e["output_len_range"]
            label = f"{e['num_requests']}x {e['input_len']} in/{lo}..{hi} out (tok/s)"
        elif scen == "decode":
            label = f"batch-1 decode, {e['output_len']} tok (ms/token)"
        row = f"{label:<34}" + "".join(f"{format(e[n][key], fmt):>12}" for n in names)
        for r in ratios:
            row += f"{e[r]:>11.2f}x" if r in e else f"{'-':>12}"
        out.append(row)
        first = e[names[0]]
        reps = first.get("samples_output_tokens_per_second") or first.get("samples_ms_per_token")
        if ratios and len(reps or []) > 1:
            paired = "".join(
                f"{e['paired_' + r]:>11.2f}x" if "paired_" + r in e else f"{'-':>12}"
                for r in ratios
            )
            out.append(f"{'  paired (median of per-repeat)':<{34 + 12 * len(names)}}" + paired)
    if "variable" in doc and "hf" in doc["variable"]:
        v = doc["variable"]["hf"]
        out.append(
            f"static batches generated {v['generated_tokens']} tokens for "
            f"{v['total_output_tokens']} requested"
        )
    out.append("speedup: rayfleet over transformers (ms/token: hf/rayfleet; tok/s: rayfleet/hf)")
    if "baseline" in names:
        out.append(f"vs_baseline: rayfleet over itself with {doc.get('baseline_overrides')}")
    if not all(doc.get("lengths_ok", {}).values()):
        out.append(f"WARNING: some outputs had the wrong length: {doc['lengths_ok']}")
    out.append("=" * w)
    return "\n".join(out)


def add_args(p) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the default model)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder for the engine and for drawing prompt tokens (default: the model's)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--min-output-len", type=int, default=16, help="variable scenario: shortest")
    p.add_argument("--max-output-len", type=int, default=256, help="variable scenario: longest")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="HF static batch size = engine max_num_seqs (default: --num-requests)",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-hf", action="store_true", help="rayfleet only")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 8 requests, 32 in / 32 out, 8..64 variable, 1 repeat",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=key_value_arg,
        metavar="KEY=VALUE",
        help="an engine config field for rayfleet's side (a YAML value), e.g. "
        "max_num_batched_tokens=1024; repeatable",
    )
    p.add_argument(
        "--baseline-set",
        action="append",
        default=[],
        type=key_value_arg,
        metavar="KEY=VALUE",
        help="also run rayfleet with this engine field changed (a YAML value), as a "
        "'baseline' side interleaved with the others, e.g. cpu_packed_weights=none; repeatable",
    )
    p.add_argument("--result-dir", default=None, help="default: loadtests/results")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--no-save", action="store_true")


def run(args) -> int:
    from rayfleet.loadtests.serve_bench import RESULTS_DIR, write_json
    from rayfleet.loadtests.workloads import default_tokenizer_path

    if args.quick:
        args.num_requests, args.input_len, args.output_len = 8, 32, 32
        args.min_output_len, args.max_output_len, args.repeats = 8, 64, 1
    cfg = EngineBenchConfig(
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        min_output_len=args.min_output_len,
        max_output_len=args.max_output_len,
        batch_size=args.batch_size or args.num_requests,
        repeats=args.repeats,
        seed=args.seed,
        scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
    )
    cfg.validate()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    engine_overrides = {k: yaml.safe_load(v) for k, v in args.set}
    model_path = args.model or default_tokenizer_path()
    tokenizer, vocab = _prompt_source(model_path, args.tokenizer)
    prompts = make_prompts(tokenizer, cfg.num_requests, cfg.input_len, cfg.seed, vocab)

    def rayfleet_side(overrides: dict) -> RayfleetSide:
        return RayfleetSide(
            args.model,
            args.dtype,
            args.device,
            cfg.batch_size,
            args.max_num_batched_tokens,
            args.tokenizer,
            overrides,
        )

    t = time.perf_counter()
    rf = rayfleet_side(engine_overrides)
    load_rf = time.perf_counter() - t
    sides: dict[str, GenerateFn] = {"rayfleet": rf.generate}
    baseline_overrides = None
    if args.baseline_set:
        baseline_overrides = engine_overrides | {k: yaml.safe_load(v) for k, v in args.baseline_set}
        sides["baseline"] = rayfleet_side(baseline_overrides).generate
    load_hf = None
    if not args.skip_hf:
        t = time.perf_counter()
        hf = HFSide(model_path, args.dtype, args.device, cfg.batch_size)
        load_hf = time.perf_counter() - t
        sides["hf"] = hf.generate
    print(
        f"model {model_path}: rayfleet loaded in {load_rf:.1f} s"
        + (f", transformers in {load_hf:.1f} s" if load_hf is not None else "")
    )
    doc = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "tool": "rayfleet bench engine",
        "model_id": str(model_path),
        "dtype": args.dtype,
        "device": args.device,
        "num_threads": torch.get_num_threads(),
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "engine_overrides": engine_overrides,
        "baseline_overrides": baseline_overrides,
        "load_time_s": {"rayfleet": load_rf, "hf": load_hf},
    }
    doc.update(run_scenarios(sides, prompts, cfg))
    print(format_table(doc))
    if not args.no_save:
        d = Path(args.result_dir) if args.result_dir else RESULTS_DIR
        name = (
            args.result_filename
            or f"engine-{Path(str(model_path)).name}-{args.device}-{doc['date']}.json"
        )
        print(f"result: {write_json(doc, d / name)}")
    return 0 if all(doc["lengths_ok"].values()) else 1
