"""Find a model on disk, read its config, and stream its weights as (HF name, tensor) pairs.

A model is a local Hugging Face folder (config.json + one or several *.safetensors, with
model.safetensors.index.json when sharded) or a single GGUF file (dequantized at load with
the `gguf` package; llama.cpp's tensor names are mapped back to Hugging Face's and its
Q/K row permutation undone). `None` means the default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .models import MODEL_REGISTRY

# GGUF architecture name -> Hugging Face architecture (the ones this engine runs).
_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# llama.cpp tensor names -> Hugging Face names (Llama family).
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_SKIPPED = {"rope_freqs.weight"}


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_model_path(model: str | None) -> str:
    """None -> the default model's folder (fetched on first use); otherwise an existing
    model folder or .gguf file, as an absolute path."""
    if model is None:
        from .default_model import default_model_path

        return default_model_path()
    p = Path(model).expanduser()
    if is_gguf(p):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {str(p)!r}")
        return str(p.resolve())
    if not p.exists():
        raise FileNotFoundError(
            f"model not found: {model!r} is neither a local folder nor a .gguf file "
            "(rayfleet loads models from disk only; no model hub)"
        )
    if not p.is_dir():
        raise ValueError(f"model path {model!r} is a file but not a .gguf file")
    return str(p.resolve())


def load_hf_config(path: str | os.PathLike) -> Any:
    """The model's transformers PretrainedConfig, from config.json or the GGUF metadata."""
    from transformers import AutoConfig

    path = Path(path)
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {str(path)!r}")
        reader = _gguf_reader(path)
        arch = _gguf_field(reader, "general.architecture")
        if any(t.name in _GGUF_SKIPPED for t in reader.tensors):
            raise ValueError(
                f"GGUF file {str(path)!r} carries rope_freqs (Llama 3.1-style RoPE scaling "
                "factors), which rayfleet cannot read from GGUF yet; use the model's Hugging "
                "Face folder instead"
            )
        if arch not in _GGUF_ARCHITECTURES:
            raise ValueError(
                f"GGUF file {str(path)!r} has architecture {arch!r}; supported: "
                f"{', '.join(sorted(_GGUF_ARCHITECTURES))}"
            )
        try:
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(
                f"cannot read the model config from GGUF file {str(path)!r}: {e}"
            ) from e
        if not getattr(config, "architectures", None):
            config.architectures = [_GGUF_ARCHITECTURES[arch]]
        return config
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {str(path)!r}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model folder {str(path)!r} has no config.json")
    try:
        json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"config file {str(cfg_file)!r} is not valid JSON: {e}") from e
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot load model config {str(cfg_file)!r}: {e}") from e


def get_model_architecture(config: Any) -> type:
    """The rayfleet model class for this config; ValueError listing the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    if not names:
        mt = getattr(config, "model_type", None)
        if mt in _MODEL_TYPE_ARCHITECTURES:
            names = [_MODEL_TYPE_ARCHITECTURES[mt]]
    for name in names:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported model architecture {names or getattr(config, 'model_type', None)!r}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )


def iterate_weights(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face tensor name, CPU tensor) for every tensor of the checkpoint."""
    path = Path(path)
    if is_gguf(path):
        yield from _iterate_gguf(path)
        return
    yield from _iterate_safetensors(path)


def safetensors_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoint's *.safetensors files (from the index when there is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {str(folder)!r}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"bad safetensors index {str(index)!r}: {e}") from e
        files = [folder / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"weights file {str(f)!r} listed in {index.name} does not exist"
                )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in model folder {str(folder)!r} "
            "(PyTorch .bin checkpoints are not supported)"
        )
    return files


def _iterate_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in safetensors_files(folder):
        _check_safetensors_size(f)
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends
            raise ValueError(f"corrupt safetensors file {str(f)!r}: {e}") from e
        with handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                try:
                    tensor = handle.get_tensor(name)
                except Exception as e:  # noqa: BLE001
                    raise ValueError(
                        f"corrupt safetensors file {str(f)!r}: cannot read tensor {name!r}: {e}"
                    ) from e
                yield name, tensor


def _check_safetensors_size(f: Path) -> None:
    """A truncated file: the header promises more bytes than the file has."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes does not fit in {size} bytes")
            header = json.loads(fh.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        if 8 + n + end > size:
            raise ValueError(f"tensor data needs {8 + n + end} bytes, the file has {size}")
    except ValueError as e:
        raise ValueError(f"corrupt or truncated safetensors file {str(f)!r}: {e}") from e


# ---------------------------------------------------------------------------------------- GGUF


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read GGUF file {str(path)!r}: {e}") from e


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_tensor_name_to_hf(name: str) -> str | None:
    """llama.cpp tensor name -> Hugging Face name (None for tensors with no HF counterpart)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    if name in _GGUF_SKIPPED:
        return None
    m = _GGUF_LAYER_RE.match(name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unknown GGUF tensor {name!r}")


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of q/k rows (interleaved -> rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _iterate_gguf(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize

    if not path.is_file():
        raise FileNotFoundError(f"GGUF model file not found: {str(path)!r}")
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(path)!r} has architecture {arch!r}; supported: "
            f"{', '.join(sorted(_GGUF_ARCHITECTURES))}"
        )
    n_head = _gguf_field(reader, f"{arch}.attention.head_count")
    n_kv = _gguf_field(reader, f"{arch}.attention.head_count_kv", n_head)
    permuted = arch in ("llama", "mistral")  # llama.cpp permutes q/k only for these
    for t in reader.tensors:
        hf_name = gguf_tensor_name_to_hf(t.name)
        if hf_name is None:
            continue
        try:
            arr = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"cannot dequantize tensor {t.name!r} ({t.tensor_type.name}) of {str(path)!r}: {e}"
            ) from e
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not arr.flags.writeable:  # a view of the read-only memory map (F32 tensors)
            arr = arr.copy()
        tensor = torch.from_numpy(arr).reshape(shape)
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_qk(tensor, n_head)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_qk(tensor, n_kv)
        yield hf_name, tensor
