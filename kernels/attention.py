"""Paged attention over a block-table KV cache, plus the dense reference that is its oracle.

A step's batch is flat: sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`,
which are its LAST q_i tokens out of `context_lens[i]` tokens whose keys/values are already
in the cache (chunked prefill, plain prefill and decode are the same thing). Causal: query
token j of sequence i (absolute position ctx_i - q_i + j) sees keys 0..ctx_i - q_i + j.

On the CPU, decode rows (q_i == 1) go to the C++ kernel `kernels/csrc/
paged_decode_attention.cpp`, which reads K/V in place from the cache (`cpu_kernels`), when it
could be built. Otherwise (and on CUDA, until GPU kernels land) decode rows are batched in
chunks, padded to the chunk's longest context and masked, with the GQA group folded into
SDPA's query-length axis (no K/V repeat). Prefill rows gather their sequence's K/V once and
call SDPA. Gathers copy whole blocks into buffers of a reusable `AttentionWorkspace`. The
per-step index work lives in a `PagedAttentionPlan` built once per step and shared by every
layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_kernels


class AttentionWorkspace:
    """Scratch buffers for gathered K/V, reused by every layer and every step.

    A fresh multi-megabyte tensor per layer costs page faults that exceed the copy itself
    (large CPU allocations are mmapped and zero-filled on first touch), so the gathers
    write into these instead. Owned by the caller (one per model runner)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._bufs.get(name)
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)


@dataclass
class _DecodeChunk:
    """Consecutive single-token sequences attended together, padded to their longest."""

    rows: slice | torch.Tensor  # their query rows: a slice when consecutive
    num: int
    block_ids: torch.Tensor  # [num * nb] int64: each sequence's nb blocks (padded with 0)
    max_len: int
    mask: torch.Tensor | None  # [num, 1, 1, max_len] bool (True = attend); None: no padding


@dataclass
class _DecodeBatch:
    """All single-token sequences of the step, for the C++ kernel (no padding, no gather)."""

    block_tables: torch.Tensor  # [n, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [n] int32
    rows: torch.Tensor  # [n] int64: each sequence's query row
    all_rows: bool  # the rows are exactly 0..T-1 (a pure decode step)


@dataclass
class _PrefillSeq:
    start: int  # first query row
    end: int  # one past the last query row
    context_len: int
    block_ids: torch.Tensor  # [num_blocks] int64, the blocks covering the context
    mask: torch.Tensor | None  # [q, ctx] bool (True = attend); None when q == ctx (plain causal)


@dataclass
class PagedAttentionPlan:
    """Index tensors for one step's paged attention, shared by all layers of the step."""

    num_tokens: int
    block_size: int
    decode_chunks: list[_DecodeChunk] = field(default_factory=list)
    decode_batch: _DecodeBatch | None = None
    prefills: list[_PrefillSeq] = field(default_factory=list)
    workspace: AttentionWorkspace | None = None

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device | str = "cpu",
        *,
        workspace: AttentionWorkspace | None = None,
        decode_chunk_tokens: int = 8192,
        use_cpu_kernel: bool | None = None,
    ) -> PagedAttentionPlan:
        """From plain Python lists (no device syncs). `block_tables[i]` needs at least
        ceil(context_lens[i] / block_size) entries. Decode sequences go to the C++ CPU
        kernel when `use_cpu_kernel` (None: when the device is the CPU and the kernel is
        built); otherwise they are attended in chunks of about `decode_chunk_tokens`
        gathered (padded) tokens, so each chunk's K/V stays in cache between the gather and
        the attention."""
        n = len(context_lens)
        if len(block_tables) != n or len(query_lens) != n:
            raise ValueError(
                f"block_tables ({len(block_tables)}), context_lens ({n}) and query_lens "
                f"({len(query_lens)}) must have one entry per sequence"
            )
        plan = cls(num_tokens=int(sum(query_lens)), block_size=block_size, workspace=workspace)
        decode: list[tuple[int, int, int]] = []  # (row, seq, context length)
        row = 0
        for i in range(n):
            q, ctx = int(query_lens[i]), int(context_lens[i])
            if q < 1 or q > ctx:
                raise ValueError(
                    f"sequence {i}: query length {q} must be in [1, context length {ctx}]"
                )
            nb = -(-ctx // block_size)
            if len(block_tables[i]) < nb:
                raise ValueError(
                    f"sequence {i}: context length {ctx} needs {nb} blocks of {block_size}, "
                    f"its block table has {len(block_tables[i])}"
                )
            if q == 1:
                decode.append((row, i, ctx))
            else:
                mask = None
                if q != ctx:
                    qpos = torch.arange(ctx - q, ctx, device=device)
                    mask = torch.arange(ctx, device=device)[None, :] <= qpos[:, None]
                ids = torch.tensor(list(block_tables[i][:nb]), dtype=torch.long, device=device)
                plan.prefills.append(_PrefillSeq(row, row + q, ctx, ids, mask))
            row += q
        if use_cpu_kernel is None:
            use_cpu_kernel = torch.device(device).type == "cpu" and cpu_kernels.available()
        if decode and use_cpu_kernel:
            plan.decode_batch = _decode_batch(decode, block_tables, block_size, plan.num_tokens)
            return plan
        chunk: list[tuple[int, int, int]] = []
        chunk_nb = 0
        for item in decode:
            nb = -(-item[2] // block_size)
            if chunk and (len(chunk) + 1) * max(chunk_nb, nb) * block_size > decode_chunk_tokens:
                plan.decode_chunks.append(_decode_chunk(chunk, block_tables, block_size, device))
                chunk, chunk_nb = [], 0
            chunk.append(item)
            chunk_nb = max(chunk_nb, nb)
        if chunk:
            plan.decode_chunks.append(_decode_chunk(chunk, block_tables, block_size, device))
        return plan


def _decode_chunk(items, block_tables, block_size, device) -> _DecodeChunk:
    rows = [r for r, _, _ in items]
    lens = [c for _, _, c in items]
    max_len = max(lens)
    nb = -(-max_len // block_size)
    ids: list[int] = []
    for _, i, ctx in items:
        own = list(block_tables[i][: -(-ctx // block_size)])
        ids.extend(own + [0] * (nb - len(own)))
    if rows == list(range(rows[0], rows[0] + len(rows))):
        row_sel: slice | torch.Tensor = slice(rows[0], rows[0] + len(rows))
    else:
        row_sel = torch.tensor(rows, dtype=torch.long, device=device)
    mask = None
    if min(lens) != max_len:
        lt = torch.tensor(lens, device=device)
        mask = (torch.arange(max_len, device=device)[None, :] < lt[:, None])[:, None, None, :]
    return _DecodeChunk(
        row_sel, len(items), torch.tensor(ids, dtype=torch.long, device=device), max_len, mask
    )


def _decode_batch(items, block_tables, block_size, num_tokens) -> _DecodeBatch:
    nbs = [-(-ctx // block_size) for _, _, ctx in items]
    width = max(nbs)
    table = [
        list(block_tables[i][:nb]) + [0] * (width - nb)
        for (_, i, _), nb in zip(items, nbs, strict=True)
    ]
    rows = [r for r, _, _ in items]
    return _DecodeBatch(
        block_tables=torch.tensor(table, dtype=torch.int32),
        context_lens=torch.tensor([c for _, _, c in items], dtype=torch.int32),
        rows=torch.tensor(rows, dtype=torch.long),
        all_rows=len(rows) == num_tokens,  # rows ascend, so n == T means 0..T-1
    )


def _gather(cache, block_ids, workspace, name) -> torch.Tensor:
    """cache[block_ids] ([n, block_size, Hkv, D]), into a reused buffer when there is one."""
    if workspace is None:
        return cache.index_select(0, block_ids)
    out = workspace.get(name, (block_ids.shape[0], *cache.shape[1:]), cache)
    return torch.index_select(cache, 0, block_ids, out=out)


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor | None,
    context_lens: torch.Tensor | None,
    query_start_loc: torch.Tensor | None,
    scale: float,
    plan: PagedAttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of `query[T, Hq, D]` over cached keys/values -> `[T, Hq, D]`.

    `block_tables[B, max_blocks]` (int32), `context_lens[B]`, `query_start_loc[B+1]`
    describe the batch; pass a prebuilt `plan` instead to skip the per-call index work
    (then the three may be None).
    """
    if plan is None:
        if block_tables is None or context_lens is None or query_start_loc is None:
            raise ValueError(
                "paged_attention needs block_tables, context_lens and query_start_loc, or a plan"
            )
        qsl = query_start_loc.tolist()
        plan = PagedAttentionPlan.build(
            block_tables.tolist(),
            context_lens.tolist(),
            [qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)],
            k_cache.shape[1],
            query.device,
        )
    t, hq, d = query.shape
    if t != plan.num_tokens:
        raise ValueError(f"query has {t} tokens, the plan expects {plan.num_tokens}")
    hkv = k_cache.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    group = hq // hkv
    ws = plan.workspace

    chunks = plan.decode_chunks
    only_chunk = (
        len(chunks) == 1
        and not plan.prefills
        and isinstance(chunks[0].rows, slice)
        and chunks[0].rows.start == 0
    )
    out = None if only_chunk else torch.empty_like(query)
    db = plan.decode_batch
    if db is not None:
        cpu_kernels.paged_decode_attention(
            query, k_cache, v_cache, db.block_tables, db.context_lens, db.rows, scale, out
        )
        if db.all_rows:
            return out
    for c in chunks:
        k = _gather(k_cache, c.block_ids, ws, "k").view(c.num, -1, hkv, d)[:, : c.max_len]
        v = _gather(v_cache, c.block_ids, ws, "v").view(c.num, -1, hkv, d)[:, : c.max_len]
        q = query[c.rows] if isinstance(c.rows, slice) else query.index_select(0, c.rows)
        o = F.scaled_dot_product_attention(
            q.view(c.num, hkv, group, d),  # the GQA group rides on SDPA's query-length axis
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=c.mask,
            scale=scale,
        ).reshape(c.num, hq, d)
        if out is None:
            return o
        if isinstance(c.rows, slice):
            out[c.rows] = o
        else:
            out.index_copy_(0, c.rows, o)
    for p in plan.prefills:
        ctx = p.context_len
        k = _gather(k_cache, p.block_ids, ws, "k").view(-1, hkv, d)[:ctx].transpose(0, 1)
        v = _gather(v_cache, p.block_ids, ws, "v").view(-1, hkv, d)[:ctx].transpose(0, 1)
        q = query[p.start : p.end].transpose(0, 1)  # [Hq, q, D]
        o = F.scaled_dot_product_attention(
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )
        out[p.start : p.end] = o[0].transpose(0, 1)
    return out


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense causal attention, the oracle: `query[Tq, Hq, D]` are the last Tq positions of
    `key`/`value[Tk, Hkv, D]`. Computed in float64, returned in query's dtype."""
    tq, hq, d = query.shape
    tk, hkv, _ = key.shape
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = hq // hkv
    q = query.double().transpose(0, 1)  # [Hq, Tq, D]
    k = key.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    v = value.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q @ k.transpose(1, 2)) * scale  # [Hq, Tq, Tk]
    qpos = torch.arange(tk - tq, tk)[:, None]
    allowed = torch.arange(tk)[None, :] <= qpos
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(0, 1).to(query.dtype)
