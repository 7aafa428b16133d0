"""Tensor-parallel linear layers (Megatron style), each loading its own shard of a full weight.

- ColumnParallelLinear: the output features are split across ranks (no communication).
- MergedColumnParallelLinear: several column-parallel outputs in one matmul (gate_up).
- QKVParallelLinear: q, k, v in one matmul; query heads split across ranks, kv heads split
  too, or replicated when there are fewer kv heads than ranks (GQA).
- RowParallelLinear: the input features are split; partial outputs are all-reduced.

Every parameter carries a `weight_loader(param, loaded_weight, shard_id=None)` that takes
the FULL checkpoint tensor (or the full q/k/v or gate/up part) and copies this rank's slice.
World size 1 is the degenerate case: the slice is the whole tensor.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel rank {tp_rank} of size {tp_size}")


def _divide(n: int, d: int, what: str) -> int:
    if n % d != 0:
        raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size ({d})")
    return n // d


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"shape mismatch loading {what}: parameter {tuple(param.shape)} vs checkpoint "
            f"slice {tuple(loaded.shape)}"
        )
    param.data.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Replicated parameter (norm weights, ...): copy the whole tensor."""
    _copy_checked(param, loaded_weight, "replicated parameter")


# oneDNN's prepacked float32 matmul (`torch.ops.mkldnn._linear_pointwise`) beats BLAS on the
# CPU only for some row counts, and which ones depends on the CPU, so a layer with a packed
# copy of its weight picks per call: `packed_rows[n]` says whether an n-row input goes to
# the packed copy; row counts past the table's end follow its last entry. The model runner
# measures the table on the machine at load (`engine/cpu_linear_tuning.py`). These defaults
# are what an earlier 2-core box measured (decoder projections 1.16-1.20x at 8-16 rows, even
# at 20-40, 0.90-0.96x at 1-4 and 48-128; the LM head 1.1-1.67x at 2-64 rows); on a 2-core
# AMD EPYC (AVX-512) box the packed copy won at every row count from 1 to 512, by 1.7-4x.
PackedRows = tuple[bool, ...]


def rows_between(lo: int, hi: int) -> PackedRows:
    """The table that sends row counts in [lo, hi) to the packed copy, and no others."""
    return tuple(lo <= n < hi for n in range(hi + 1))


PACKED_ROWS_LAYER = rows_between(8, 33)
PACKED_ROWS_LM_HEAD = rows_between(2, 65)


def cpu_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None,
    packed_rows: PackedRows,
) -> torch.Tensor:
    if packed is not None and x.dim() == 2 and packed_rows:
        n = x.shape[0]
        if packed_rows[n] if n < len(packed_rows) else packed_rows[-1]:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-blocked copy of a float32 [out, in] weight (the hint 64 is the batch the
    layout is tuned for; any row count works)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)


class _ParallelLinearBase(nn.Module):
    """Shared parameters and forward; each subclass defines `weight_loader` for its split."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        _check_tp(tp_rank, tp_size)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features  # this rank's
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=dtype, device=device), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # set by the model runner (CPU)
        self.packed_rows: PackedRows = PACKED_ROWS_LAYER  # tuned by the model runner (CPU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias, self.packed_weight, self.packed_rows)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
            f"tp={self.tp_rank}/{self.tp_size}"
        )


class ColumnParallelLinear(_ParallelLinearBase):
    """y = x W^T + b with W's rows (output features) split across ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.full_output_size = output_size
        super().__init__(
            input_size,
            _divide(output_size, tp_size, "output size"),
            bias,
            dtype,
            device,
            tp_rank,
            tp_size,
        )

    def weight_loader(self, param, loaded_weight, shard_id=None):
        n = param.shape[0]
        _copy_checked(param, loaded_weight.narrow(0, self.tp_rank * n, n), "column-parallel weight")


class MergedColumnParallelLinear(_ParallelLinearBase):
    """Several column-parallel layers sharing an input, fused (gate_proj + up_proj).

    On each rank the output is [this rank's slice of part 0, of part 1, ...]."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.output_sizes = list(output_sizes)
        local = [_divide(s, tp_size, "merged output size") for s in output_sizes]
        self.local_offsets = [sum(local[:i]) for i in range(len(local))]
        self.local_sizes = local
        super().__init__(input_size, sum(local), bias, dtype, device, tp_rank, tp_size)

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None:  # an already-merged checkpoint tensor: split it into its parts
            for i, full in enumerate(self.output_sizes):
                start = sum(self.output_sizes[:i])
                self.weight_loader(param, loaded_weight.narrow(0, start, full), i)
            return
        if not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"shard_id {shard_id!r} out of range for {len(self.output_sizes)} parts"
            )
        n = self.local_sizes[shard_id]
        if loaded_weight.shape[0] != self.output_sizes[shard_id]:
            raise ValueError(
                f"merged part {shard_id}: expected {self.output_sizes[shard_id]} rows, got "
                f"{loaded_weight.shape[0]}"
            )
        dst = param.data.narrow(0, self.local_offsets[shard_id], n)
        _copy_checked(dst, loaded_weight.narrow(0, self.tp_rank * n, n), f"merged part {shard_id}")


class QKVParallelLinear(_ParallelLinearBase):
    """Fused q/k/v projection with grouped-query attention.

    Rank r holds query heads [r*Hq/tp, (r+1)*Hq/tp) and, when Hkv >= tp, kv heads
    [r*Hkv/tp, ...); when Hkv < tp, each kv head is replicated on tp/Hkv ranks and rank r
    holds kv head r // (tp/Hkv). Local output: [q | k | v]."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        _check_tp(tp_rank, tp_size)
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp_size, "number of attention heads")
        if num_kv_heads >= tp_size:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "number of kv heads")
            self.kv_head_start = tp_rank * self.num_kv_heads
        else:
            if tp_size % num_kv_heads != 0:
                raise ValueError(
                    f"tensor_parallel_size ({tp_size}) must be a multiple of the number of kv "
                    f"heads ({num_kv_heads}) when it exceeds it"
                )
            self.num_kv_heads = 1
            self.kv_head_start = tp_rank // (tp_size // num_kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        super().__init__(
            hidden_size, self.q_size + 2 * self.kv_size, bias, dtype, device, tp_rank, tp_size
        )

    def weight_loader(self, param, loaded_weight, shard_id=None):
        d = self.head_dim
        if shard_id is None:  # a fused checkpoint tensor [q | k | v] (full sizes)
            nq, nkv = self.total_num_heads * d, self.total_num_kv_heads * d
            for sid, start, n in (("q", 0, nq), ("k", nq, nkv), ("v", nq + nkv, nkv)):
                self.weight_loader(param, loaded_weight.narrow(0, start, n), sid)
            return
        if shard_id == "q":
            full, offset, size, src = (
                self.total_num_heads * d,
                0,
                self.q_size,
                self.tp_rank * self.q_size,
            )
        elif shard_id in ("k", "v"):
            full, size = self.total_num_kv_heads * d, self.kv_size
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            src = self.kv_head_start * d
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        if loaded_weight.shape[0] != full:
            raise ValueError(f"{shard_id}_proj: expected {full} rows, got {loaded_weight.shape[0]}")
        _copy_checked(
            param.data.narrow(0, offset, size),
            loaded_weight.narrow(0, src, size),
            f"{shard_id}_proj",
        )


class RowParallelLinear(_ParallelLinearBase):
    """y = x W^T + b with W's columns (input features) split; the partial sums are
    all-reduced across ranks (when tp_size > 1) before the bias is added once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce_results: bool = True,
        tp_group=None,
    ) -> None:
        self.reduce_results = reduce_results
        self.tp_group = tp_group
        super().__init__(
            _divide(input_size, tp_size, "input size"),
            output_size,
            bias,
            dtype,
            device,
            tp_rank,
            tp_size,
        )

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if param.dim() == 1:  # bias: replicated, added once after the reduction
            _copy_checked(param, loaded_weight, "row-parallel bias")
            return
        n = param.shape[1]
        _copy_checked(param, loaded_weight.narrow(1, self.tp_rank * n, n), "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        y = cpu_linear(x, self.weight, None, self.packed_weight, self.packed_rows)
        if self.reduce_results:
            dist.all_reduce(y, group=self.tp_group)
        if self.bias is not None:
            y = y + self.bias
        return y
