"""Paged KV cache kernels: write new keys/values into their slots, copy blocks between caches.

Cache layout: `[num_blocks, block_size, num_kv_heads, head_dim]`, one tensor for keys and
one for values per layer. Token slot `s` lives at block `s // block_size`, offset
`s % block_size`. Plain PyTorch: the same code runs on the CPU and on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store `key[t]`, `value[t]` (`[T, Hkv, D]`) at slot `slot_mapping[t]` (int64, `[T]`).

    Every slot must be valid (0 <= slot < num_blocks * block_size); no padding slots.
    """
    if key.shape != value.shape or key.dim() != 3:
        raise ValueError(
            f"key and value must both be [T, Hkv, D], got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens"
        )
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key heads/dim {tuple(key.shape[1:])} do not match the cache's {tuple(k_cache.shape[2:])}"
        )
    write_kv_cache_unchecked(key, value, k_cache, v_cache, slot_mapping)


def write_kv_cache_unchecked(key, value, k_cache, v_cache, slot_mapping) -> None:
    """`write_kv_cache` without the argument checks (the per-layer hot path)."""
    if key.dtype != k_cache.dtype:
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    k_cache.view(-1, k_cache.shape[2], k_cache.shape[3]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, v_cache.shape[2], v_cache.shape[3]).index_copy_(0, slot_mapping, value)


def swap_blocks(
    src_cache: torch.Tensor,
    dst_cache: torch.Tensor,
    pairs: Sequence[tuple[int, int]] | torch.Tensor,
) -> None:
    """Copy `src_cache[s]` into `dst_cache[d]` for each `(s, d)` in `pairs`.

    The caches may live on different devices (device <-> CPU swap) and differ in their
    number of blocks; their block shape must match.
    """
    if src_cache.shape[1:] != dst_cache.shape[1:]:
        raise ValueError(
            f"block shapes differ: src {tuple(src_cache.shape[1:])} vs dst {tuple(dst_cache.shape[1:])}"
        )
    if isinstance(pairs, torch.Tensor):
        idx = pairs.to(torch.long).reshape(-1, 2).cpu()
    else:
        if len(pairs) == 0:
            return
        idx = torch.tensor(list(pairs), dtype=torch.long).reshape(-1, 2)
    if idx.numel() == 0:
        return
    src_idx = idx[:, 0].to(src_cache.device)
    dst_idx = idx[:, 1].to(dst_cache.device)
    blocks = src_cache.index_select(0, src_idx)
    non_blocking = src_cache.device.type == "cuda" and dst_cache.device.type == "cuda"
    dst_cache.index_copy_(0, dst_idx, blocks.to(dst_cache.device, non_blocking=non_blocking))
