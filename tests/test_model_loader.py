"""Model loading: paths, configs, safetensors (single and sharded), GGUF, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rayfleet.engine.model_loader import (
    get_model_architecture,
    iterate_weights,
    load_hf_config,
    resolve_model_path,
)
from rayfleet.engine.models import MODEL_REGISTRY, LlamaForCausalLM, Qwen2ForCausalLM
from safetensors.torch import load_file, save_file


def _hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_resolve_model_path_none_is_the_default_model(default_model_dir):
    assert resolve_model_path(None) == default_model_dir


def test_resolve_model_path_missing_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        resolve_model_path(str(missing))
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_missing_config_json_names_the_folder(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_hf_config(tmp_path / "m")


def test_unknown_architecture_lists_supported(tiny_model_factory):
    folder = tiny_model_factory()
    cfg = load_hf_config(folder)
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(
        ValueError,
        match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
    ):
        get_model_architecture(cfg)


def test_architecture_from_config(tiny_model_factory):
    assert (
        get_model_architecture(load_hf_config(tiny_model_factory("a", arch="qwen2")))
        is Qwen2ForCausalLM
    )
    assert set(MODEL_REGISTRY) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def test_iterate_weights_single_file_yields_every_tensor(tiny_model_factory):
    folder = tiny_model_factory()
    got = dict(iterate_weights(folder))
    ref = _hf_state_dict(folder)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_iterate_weights_sharded_uses_the_index(tiny_model_factory):
    single = tiny_model_factory("one")
    sharded = tiny_model_factory("many", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = dict(iterate_weights(single)), dict(iterate_weights(sharded))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_no_safetensors_names_the_folder(tiny_model_factory):
    folder = tiny_model_factory()
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"no \*\.safetensors weights in model folder .*tiny"
    ):
        list(iterate_weights(folder))


def test_index_pointing_at_missing_shard_names_it(tiny_model_factory):
    folder = tiny_model_factory("many", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        list(iterate_weights(folder))


def test_truncated_safetensors_names_the_file(tiny_model_factory):
    folder = tiny_model_factory()
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated safetensors file .*model\.safetensors"):
        list(iterate_weights(folder))


def test_garbage_safetensors_names_the_file(tiny_model_factory):
    folder = tiny_model_factory()
    (folder / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        list(iterate_weights(folder))


def test_missing_tensor_after_load_is_named(tiny_model_factory):
    folder = tiny_model_factory()
    sd = _hf_state_dict(folder)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    cfg = load_hf_config(folder)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight#k"):
        model.load_weights(iterate_weights(folder))


def test_unexpected_tensor_is_named(tiny_model_factory):
    folder = tiny_model_factory()
    sd = _hf_state_dict(folder)
    sd["model.layers.0.mystery.weight"] = torch.zeros(2)
    save_file(sd, str(folder / "model.safetensors"))
    model = LlamaForCausalLM(load_hf_config(folder))
    with pytest.raises(ValueError, match="model.layers.0.mystery.weight"):
        model.load_weights(iterate_weights(folder))


def test_tied_embeddings_ignore_or_tolerate_lm_head(tiny_model_factory):
    folder = tiny_model_factory(tie_word_embeddings=True)
    model = LlamaForCausalLM(load_hf_config(folder))
    model.load_weights(iterate_weights(folder))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(
        model.lm_head.weight.data, _hf_state_dict(folder)["model.embed_tokens.weight"]
    )


def test_legacy_rope_scaling_config_loads(tiny_model_factory):
    from conftest import LLAMA3_ROPE
    from rayfleet.engine.models.rotary import rope_parameters_from_config

    folder = tiny_model_factory(rope_parameters=LLAMA3_ROPE, legacy_rope_scaling=True)
    assert "rope_scaling" in json.loads((folder / "config.json").read_text())
    params = rope_parameters_from_config(load_hf_config(folder))
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    assert params["original_max_position_embeddings"] == 32


# ------------------------------------------------------------------------------- GGUF


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows (what the loader undoes)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(folder: Path, out: Path, arch: str = "llama") -> None:
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    sd = _hf_state_dict(folder)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in sd.items():
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and ".q_proj." in name:
            t = _llama_cpp_permute(t, cfg["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
        # half of the tensors as F16 to exercise dequantization of another type
        arr = t.numpy() if "norm" in name or "q_proj" in name else t.half().numpy()
        w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_weights_map_to_hf_names_and_unpermute_qk(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()  # llama, GQA: q and k permuted with different head counts
    gguf_file = tmp_path / "tiny.gguf"
    _write_gguf(folder, gguf_file)
    ref = _hf_state_dict(folder)
    got = dict(iterate_weights(gguf_file))
    assert set(got) == set(ref)
    for k, v in ref.items():
        expect = v if ("norm" in k or "q_proj" in k) else v.half().float()
        assert torch.equal(got[k], expect), k


def test_gguf_config_and_model_load_from_the_file(tiny_model_factory, tmp_path):
    folder = tiny_model_factory()
    gguf_file = tmp_path / "tiny.gguf"
    _write_gguf(folder, gguf_file)
    assert resolve_model_path(str(gguf_file)) == str(gguf_file.resolve())
    cfg = load_hf_config(gguf_file)
    assert get_model_architecture(cfg) is LlamaForCausalLM
    ref_cfg = json.loads((folder / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
    ):
        assert getattr(cfg, key) == ref_cfg[key], key
    assert cfg.tie_word_embeddings is False  # output.weight present
    model = LlamaForCausalLM(cfg)
    model.load_weights(iterate_weights(gguf_file))


def test_gguf_unknown_tensor_and_bad_file_are_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        list(iterate_weights(bad))
    from rayfleet.engine.model_loader import gguf_tensor_name_to_hf

    with pytest.raises(ValueError, match="blk.0.weird"):
        gguf_tensor_name_to_hf("blk.0.weird.weight")
