"""Chained, deterministic block hashes shared by the engine and the router.

Pure Python (no torch): the router imports this to hash a prompt exactly as every replica
does, without loading a model. A block's hash covers its parent's hash, its own token ids
and extra keys (model or adapter name), so equal hashes mean equal prefixes. Python's
built-in `hash()` is salted per process and would make router and replicas disagree;
xxh3-128 is fast, stable across processes and machines, and wide enough that collisions
are not a practical concern.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

# The parent of a request's first block. A fixed value, so first blocks of equal
# prompts hash equally everywhere.
ROOT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_keys: str = "") -> int:
    """Hash of one full block given its parent's hash (ROOT_HASH for the first block)."""
    h = xxhash.xxh3_128()
    h.update(parent_hash.to_bytes(16, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_keys:
        h.update(b"\x00")
        h.update(extra_keys.encode())
    return h.intdigest()


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: str = "",
    parent_hash: int = ROOT_HASH,
) -> list[int]:
    """Chained hashes of every *full* block of `token_ids`; a trailing partial block has none."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block(parent_hash, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent_hash)
    return hashes
