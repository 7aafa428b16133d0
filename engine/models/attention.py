"""Paged attention layer: writes this step's keys/values into the KV cache, then attends.

`AttentionMetadata` is built once per step by the ModelRunner and passed explicitly to
every layer (no hidden forward context)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rayfleet.kernels.attention import PagedAttentionPlan, paged_attention
from rayfleet.kernels.cache import write_kv_cache_unchecked
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    plan: PagedAttentionPlan  # per-step index tensors (block tables, masks) for the kernel
    # The raw batch description, for kernels that want it (e.g. future GPU kernels).
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    context_lens: torch.Tensor | None = None  # [B] int32
    query_start_loc: torch.Tensor | None = None  # [B + 1] int32
    positions: torch.Tensor | None = None  # [T] int64, for fused rotary + cache-write kernels


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q[T, Hq, D], k/v[T, Hkv, D] -> [T, Hq * D]."""
        k_cache, v_cache = kv_cache
        write_kv_cache_unchecked(k, v, k_cache, v_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta)

    def attend(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention only, for callers that already wrote this step's K/V into the cache."""
        k_cache, v_cache = kv_cache
        out = paged_attention(q, k_cache, v_cache, None, None, None, self.scale, plan=meta.plan)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
