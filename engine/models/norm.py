"""RMSNorm with an optional fused residual add (the Llama family's pre-norm)."""

from __future__ import annotations

import torch
from rayfleet.kernels import cpu_kernels
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in float32 like Hugging Face's.

    `forward(x, residual)` first adds the residual and returns (normed, new residual). With
    `fused` (the model's CPU kernels) that pair is one C++ op working in place on both `x`
    and `residual`, which the decoder layers own (fresh outputs of the previous op)."""

    fused = False  # set by the model when the C++ CPU kernels are in use

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False
        )

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # skip the no-op casts (each one is a dispatcher call)
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        dtype = x.dtype
        x32 = x.float()
        var = x32.pow(2).mean(-1, keepdim=True)
        return self.weight * (x32 * torch.rsqrt(var + self.eps)).to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        if self.fused:
            cpu_kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
            return x, residual
        x = residual + x
        return self._norm(x), x
