"""Model registry: Hugging Face `architectures` name -> rayfleet model class."""

from __future__ import annotations

from .llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]
