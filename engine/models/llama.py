"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Same module names as Hugging Face's (`model.layers.N.self_attn...`) with q/k/v and gate/up
fused into one matmul each; `load_weights` maps the checkpoint's names onto the fused
parameters and each layer's weight loader cuts this rank's tensor-parallel shard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from rayfleet.kernels import cpu_kernels
from torch import nn

from .attention import AttentionMetadata, PagedAttention
from .embedding import ParallelLMHead, VocabParallelEmbedding
from .linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from .norm import RMSNorm
from .rotary import RotaryEmbedding, rope_parameters_from_config

KVCache = tuple[torch.Tensor, torch.Tensor]


def head_dim_of(hf_config: Any) -> int:
    return getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )


class LlamaAttention(nn.Module):
    fused = False  # C++ CPU kernels: rotary + cache write in one op (set by the model)

    def __init__(self, cfg: Any, qkv_bias: bool, o_bias: bool, dtype, device, tp_rank, tp_size):
        super().__init__()
        self.head_dim = head_dim_of(cfg)
        num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        tp = dict(dtype=dtype, device=device, tp_rank=tp_rank, tp_size=tp_size)
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, self.head_dim, cfg.num_attention_heads, num_kv, bias=qkv_bias, **tp
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias=o_bias, **tp
        )
        self.attn = PagedAttention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rotary: RotaryEmbedding,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        t = hidden.shape[0]
        hq, hkv = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(hidden).view(t, hq + 2 * hkv, self.head_dim)
        if self.fused:
            cpu_kernels.rotary_embedding_and_cache(
                qkv, meta.positions, rotary.cos_cache, rotary.sin_cache, *kv_cache,
                meta.slot_mapping, hq, hkv,
            )  # fmt: skip
            return self.o_proj(self.attn.attend(qkv[:, :hq], kv_cache, meta))
        qk = rotary.apply(qkv[:, : hq + hkv], cos, sin)  # rotate q and k in one go
        out = self.attn(qk[:, :hq], qk[:, hq:], qkv[:, hq + hkv :], kv_cache, meta)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    fused = False  # C++ CPU kernels: silu(gate) * up in one op (set by the model)

    def __init__(self, cfg: Any, bias: bool, dtype, device, tp_rank, tp_size):
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r}; supported: silu")
        tp = dict(dtype=dtype, device=device, tp_rank=tp_rank, tp_size=tp_size)
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias, **tp
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias, **tp)
        self.local_intermediate = self.gate_up_proj.local_sizes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            return self.down_proj(cpu_kernels.silu_and_mul(gate_up))
        n = self.local_intermediate
        return self.down_proj(F.silu(gate_up[:, :n]) * gate_up[:, n:])


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, qkv_bias: bool, o_bias: bool, dtype, device, tp_rank, tp_size):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = LlamaAttention(cfg, qkv_bias, o_bias, dtype, device, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, dtype=dtype, device=device)
        self.mlp = LlamaMLP(
            cfg, bool(getattr(cfg, "mlp_bias", False)), dtype, device, tp_rank, tp_size
        )

    def forward(self, hidden, residual, cos, sin, rotary, kv_cache, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, rotary, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    fused = False

    def __init__(
        self, cfg: Any, qkv_bias, o_bias, dtype, device, tp_rank, tp_size, max_position=None
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            device=device,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, qkv_bias, o_bias, dtype, device, tp_rank, tp_size)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(
            head_dim_of(cfg),
            max_position or cfg.max_position_embeddings,
            rope_parameters_from_config(cfg),
            dtype=dtype,
            device=device,
        )

    def forward(self, input_ids, positions, kv_caches, meta):
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} kv caches for {len(self.layers)} layers")
        hidden = self.embed_tokens(input_ids)
        if self.fused:  # the layers read the rotary tables by position themselves
            cos = sin = None
            if meta.positions is None:
                meta.positions = positions
        else:
            cos, sin = self.rotary_emb.cos_sin(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, cos, sin, self.rotary_emb, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """forward(input_ids[T], positions[T], kv_caches, attn_metadata) -> hidden[T, H];
    compute_logits(hidden[N, H]) -> float32 logits[N, vocab]."""

    qkv_bias: bool | None = None  # None: the config's `attention_bias`
    o_bias: bool | None = None

    def __init__(
        self,
        hf_config: Any,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp_rank: int = 0,
        tp_size: int = 1,
        max_position: int | None = None,
    ) -> None:
        super().__init__()
        self.config = hf_config
        attn_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = attn_bias if self.qkv_bias is None else self.qkv_bias
        o_bias = attn_bias if self.o_bias is None else self.o_bias
        self.model = LlamaModel(
            hf_config, qkv_bias, o_bias, dtype, device, tp_rank, tp_size, max_position
        )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            dtype=dtype,
            device=device,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if self.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def use_fused_cpu_kernels(self, enabled: bool) -> None:
        """Route RMSNorm (+ residual), rotary (+ cache write) and SiLU-and-mul through the
        C++ CPU kernels (`rayfleet.kernels.cpu_kernels`, which must be `available()`)."""
        for m in self.modules():
            if isinstance(m, RMSNorm | LlamaAttention | LlamaMLP | LlamaModel):
                m.fused = enabled

    # (checkpoint name fragment, fused parameter fragment, shard id)
    stacked_params = (
        (".q_proj.", ".qkv_proj.", "q"),
        (".k_proj.", ".qkv_proj.", "k"),
        (".v_proj.", ".qkv_proj.", "v"),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (Hugging Face name, full tensor) pairs; raises ValueError naming any parameter
        left unloaded, or a checkpoint tensor that matches no parameter."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or "rotary_emb.cos_cached" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # tied: the embedding is the head
            target, shard = name, None
            for ckpt, fused, sid in self.stacked_params:
                if ckpt in name:
                    target, shard = name.replace(ckpt, fused), sid
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"checkpoint tensor {name!r} matches no parameter of {type(self).__name__}"
                )
            loader = getattr(param, "weight_loader", default_weight_loader)
            with torch.no_grad():
                loader(param, tensor.to(param.dtype), shard)
            loaded.add(f"{target}#{shard}" if shard is not None else target)
        expected: set[str] = set()
        for pname in params:
            if pname == "lm_head.weight" and self.tie_word_embeddings:
                continue
            if ".qkv_proj." in pname:
                expected.update(f"{pname}#{s}" for s in ("q", "k", "v"))
            elif ".gate_up_proj." in pname:
                expected.update(f"{pname}#{s}" for s in (0, 1))
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
            )
            raise ValueError(f"weights missing from the checkpoint: {shown}")


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False
