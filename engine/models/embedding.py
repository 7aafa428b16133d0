"""Vocabulary-parallel token embedding and LM head.

The vocabulary is split into `ceil(vocab / tp_size)`-row shards; rank r owns token ids
[r * shard, min((r + 1) * shard, vocab)); rows past the vocabulary are zero padding.
The embedding masks ids outside its shard and all-reduces; the LM head computes its shard's
logits and all-gathers them (then drops the padding).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .linear import PACKED_ROWS_LM_HEAD, PackedRows, cpu_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group=None,
    ) -> None:
        super().__init__()
        if tp_size < 1 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"invalid tensor-parallel rank {tp_rank} of size {tp_size}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size, self.tp_group = tp_rank, tp_size, tp_group
        self.shard_size = -(-num_embeddings // tp_size)
        self.vocab_start = tp_rank * self.shard_size
        self.vocab_end = min(self.vocab_start + self.shard_size, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.shard_size, embedding_dim, dtype=dtype, device=device),
            requires_grad=False,
        )
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"embedding: expected a [{self.num_embeddings}, {self.embedding_dim}] tensor, "
                f"got {tuple(loaded_weight.shape)}"
            )
        n = max(self.vocab_end - self.vocab_start, 0)
        param.data[:n].copy_(loaded_weight[self.vocab_start : self.vocab_start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_shard = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(~in_shard, 0)
        out = F.embedding(local, self.weight).masked_fill(~in_shard.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.tp_group)
        return out

    def extra_repr(self) -> str:
        return (
            f"vocab={self.num_embeddings}, dim={self.embedding_dim}, "
            f"rows=[{self.vocab_start}, {self.vocab_end}), tp={self.tp_rank}/{self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; `tie(embedding)` shares the embedding's weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed_weight: torch.Tensor | None = None  # set by the model runner (CPU)
        self.packed_rows: PackedRows = PACKED_ROWS_LM_HEAD  # tuned by the model runner (CPU)

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        if (embedding.num_embeddings, embedding.shard_size) != (
            self.num_embeddings,
            self.shard_size,
        ):
            raise ValueError("cannot tie an LM head to an embedding of another vocabulary size")
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D401
        """hidden[N, H] -> logits[N, vocab] in float32."""
        logits = cpu_linear(hidden, self.weight, None, self.packed_weight, self.packed_rows)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits, group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        if logits.shape[-1] != self.num_embeddings:
            logits = logits[..., : self.num_embeddings]
        return logits.float()
