"""The serving config tree: every file in configs/ loads; bad config fails naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from rayfleet.cluster.config import (
    DEFAULT_MODEL_NAME,
    ConfigError,
    RayfleetConfig,
    load_config,
    merge,
    parse_config,
)
from rayfleet.engine import EngineConfig

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "llama-3-8b.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg.engine, EngineConfig)
    assert cfg.served_model_name
    opts = cfg.replica.deployment_options()
    assert opts["max_ongoing_requests"] > 5  # Serve's default would starve the engine
    assert ("num_replicas" in opts) != ("autoscaling_config" in opts)


def test_default_yaml_is_the_default_model_on_the_cpu():
    cfg = load_config(CONFIGS[0].parent / "default.yaml")
    assert cfg.model.path is None
    assert cfg.served_model_name == DEFAULT_MODEL_NAME
    assert cfg.engine.device == "cpu"
    assert cfg.replica.resources.num_gpus == 0


def test_empty_config_is_all_defaults():
    cfg = parse_config({})
    assert cfg == RayfleetConfig()
    assert cfg.replica.deployment_options()["num_replicas"] == 1


def errors(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "x.yaml")
    return str(e.value)


def test_unknown_key_fails_with_its_path():
    msg = errors({"engine": {"blok_size": 16}})
    assert "engine.blok_size" in msg and "unknown key" in msg and "x.yaml" in msg


def test_unknown_top_level_key_fails():
    assert "modle" in errors({"modle": {}})


def test_bad_value_fails_with_its_path_and_value():
    msg = errors({"replica": {"max_ongoing_requests": 0}})
    assert "replica.max_ongoing_requests" in msg and "0" in msg


def test_several_errors_are_all_reported():
    msg = errors({"server": {"port": 70000}, "engine": {"block_size": 0}})
    assert "server.port" in msg and "engine.block_size" in msg


def test_engine_validators_still_apply():
    msg = errors({"engine": {"enable_chunked_prefill": False, "max_model_len": 4096,
                             "max_num_batched_tokens": 1024}})  # fmt: skip
    assert "engine" in msg and "max_num_batched_tokens" in msg


def test_num_replicas_and_autoscaling_are_exclusive():
    msg = errors({"replica": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}})
    assert "replica" in msg and "not both" in msg


def test_autoscaling_bounds_are_checked():
    msg = errors({"replica": {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}})
    assert "replica.autoscaling_config" in msg


def test_autoscaling_config_reaches_serve_options():
    cfg = parse_config({"replica": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}})
    opts = cfg.replica.deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts


def test_resources_become_ray_actor_options():
    cfg = parse_config(
        {"replica": {"resources": {"num_cpus": 4, "num_gpus": 1, "accelerator_type": "H100",
                                   "custom": {"tp_group": 1}}}}
    )  # fmt: skip
    assert cfg.replica.ray_actor_options() == {
        "num_cpus": 4,
        "num_gpus": 1,
        "accelerator_type": "H100",
        "resources": {"tp_group": 1},
    }


def test_zero_replicas_is_refused():
    assert "replica.num_replicas" in errors({"replica": {"num_replicas": 0}})


def test_model_branch_folds_into_the_engine_config():
    cfg = parse_config({"model": {"path": "/models/Llama-3-8B/", "tokenizer": "/tok"}})
    e = cfg.engine_config()
    assert (e.model, e.tokenizer, e.served_model_name) == (
        "/models/Llama-3-8B/",
        "/tok",
        "Llama-3-8B",
    )


@pytest.mark.parametrize(
    "model,name",
    [
        ({}, DEFAULT_MODEL_NAME),
        ({"path": "/m/Qwen2-0.5B"}, "Qwen2-0.5B"),
        ({"path": "/m/smol.Q4_1.gguf"}, "smol.Q4_1"),
        ({"path": "/m/x", "served_name": "team/x"}, "team/x"),
    ],
)
def test_served_model_name(model, name):
    assert parse_config({"model": model}).served_model_name == name


def test_engine_served_name_is_honoured():
    cfg = parse_config({"engine": {"model": "/m/abc", "served_model_name": "abc-v2"}})
    assert cfg.served_model_name == "abc-v2"
    assert cfg.engine_config().model == "/m/abc"


def test_model_and_engine_must_not_disagree():
    assert "model.path" in errors({"model": {"path": "/a"}, "engine": {"model": "/b"}})


def test_api_keys_are_secret_but_carried_to_the_app():
    cfg = parse_config({"server": {"api_keys": ["sk-1"]}})
    assert "sk-1" not in repr(cfg)
    assert parse_config(cfg.to_args()).server.resolved_api_keys() == ["sk-1"]


def test_api_keys_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_KEYS", "a, b,,c")
    cfg = parse_config({"server": {"api_keys": ["z"], "api_keys_env": "MY_KEYS"}})
    assert cfg.server.resolved_api_keys() == ["z", "a", "b", "c"]


def test_to_args_round_trips():
    cfg = load_config(CONFIGS[0].parent / "llama-3-8b.yaml")
    assert parse_config(cfg.to_args()) == cfg


def test_yaml_with_dotted_and_nested_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("engine:\n  block_size: 16\nserver:\n  port: 9000\n")
    cfg = load_config(
        p, overrides={"engine.block_size": "32", "server": {"host": "0.0.0.0"}, "app_name": "x"}
    )
    assert cfg.engine.block_size == 32  # strings from `serve run key=value` are coerced
    assert (cfg.server.port, cfg.server.host, cfg.app_name) == (9000, "0.0.0.0", "x")


def test_merge_does_not_mutate_its_inputs():
    base = {"a": {"b": 1}}
    out = merge(base, {"a.c": 2})
    assert out == {"a": {"b": 1, "c": 2}} and base == {"a": {"b": 1}}


def test_missing_file_and_bad_yaml_fail_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_build_app_validates_args_without_a_cluster():
    from ray.serve import Application
    from rayfleet.cluster.app import build_app, config_from_args

    app = build_app({"config": str(CONFIGS[0].parent / "default.yaml"), "engine.block_size": "32"})
    assert isinstance(app, Application)
    cfg = config_from_args({"config": {"server": {"port": 1234}}, "server.host": "0.0.0.0"})
    assert (cfg.server.port, cfg.server.host) == (1234, "0.0.0.0")
    with pytest.raises(ConfigError, match="engine.nope"):
        build_app({"engine.nope": 1})
