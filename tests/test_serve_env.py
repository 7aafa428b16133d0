"""Serve's request-path settings (`cluster/serve_env.py`): where they go, and what wins."""

from __future__ import annotations

import pytest
from rayfleet.cluster import serve_env
from rayfleet.cluster.app import llm_deployment_options
from rayfleet.cluster.config import parse_config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in (serve_env.FAST_PATH_VAR, serve_env.HANDLE_GRPC_VAR, *serve_env.PROXY_ENV):
        monkeypatch.delenv(k, raising=False)


def test_replicas_get_the_env_merged_into_their_runtime_env():
    opts = serve_env.with_replica_env(
        {"num_cpus": 2, "runtime_env": {"pip": ["x"], "env_vars": {"A": "1"}}}
    )
    assert opts["num_cpus"] == 2
    assert opts["runtime_env"]["pip"] == ["x"]
    assert opts["runtime_env"]["env_vars"] == {**serve_env.REPLICA_ENV, "A": "1"}


def test_a_value_the_config_sets_wins():
    key = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
    opts = serve_env.with_replica_env({"runtime_env": {"env_vars": {key: "1"}}})
    assert opts["runtime_env"]["env_vars"][key] == "1"


def test_the_llm_deployment_carries_the_replica_env():
    opts = llm_deployment_options(parse_config({}))
    env = opts["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env[serve_env.HANDLE_GRPC_VAR] == "1"


def test_the_proxy_env_goes_to_servers_controller_unless_already_set(monkeypatch):
    opts = serve_env.serve_start_options()
    assert opts["controller_options"]["runtime_env"]["env_vars"] == serve_env.PROXY_ENV
    monkeypatch.setenv("RAY_SERVE_PROXY_USE_GRPC", "0")
    env = serve_env.serve_start_options()["controller_options"]["runtime_env"]["env_vars"]
    assert "RAY_SERVE_PROXY_USE_GRPC" not in env


def test_fast_path_off_leaves_serves_defaults(monkeypatch):
    monkeypatch.setenv(serve_env.FAST_PATH_VAR, "0")
    assert serve_env.with_replica_env({"num_cpus": 1}) == {"num_cpus": 1}
    assert serve_env.serve_start_options() == {}


def test_the_ingress_streams_over_grpc_only_where_the_app_said_so(monkeypatch):
    assert serve_env.handle_by_reference()
    monkeypatch.setenv(serve_env.HANDLE_GRPC_VAR, "1")
    assert not serve_env.handle_by_reference()


def test_environ_sets_for_the_block_and_restores(monkeypatch):
    import os

    monkeypatch.setenv("RF_TEST_A", "old")
    monkeypatch.delenv("RF_TEST_B", raising=False)
    with serve_env.environ({"RF_TEST_A": "new", "RF_TEST_B": "b"}):
        assert (os.environ["RF_TEST_A"], os.environ["RF_TEST_B"]) == ("new", "b")
    assert os.environ["RF_TEST_A"] == "old" and "RF_TEST_B" not in os.environ
    with serve_env.environ({"RF_TEST_A": "new"}, keep_set=True):
        assert os.environ["RF_TEST_A"] == "old"
