"""Serve's queue bound and the admission queue agree.

Serve's `max_queued_requests` counts every request its router has not sent yet, those parked
in rayfleet's admission queue included; left at a value below `router.queue.max_len`, it
would answer 429 long before the queue fills. So with rayfleet's router (kv-aware,
round-robin) Serve's bound is off by default and the admission queue is the bound; an
explicit `replica.max_queued_requests` stays Serve's bound and caps the queue to match.
Under power-of-two (Serve's own router) it is Serve's bound, 256 by default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rayfleet.cluster.app import llm_deployment_options
from rayfleet.cluster.config import (
    SERVE_MAX_QUEUED_REQUESTS,
    ConfigError,
    load_config,
    parse_config,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def queue_len(opts: dict) -> int:
    return opts["request_router_config"].request_router_kwargs["queue"]["max_len"]


def test_by_default_the_admission_queue_is_the_bound_and_serves_is_off():
    opts = llm_deployment_options(parse_config({}))
    assert opts["max_queued_requests"] == -1
    assert queue_len(opts) == 1024


@pytest.mark.parametrize("policy", ["kv-aware", "round-robin"])
def test_an_explicit_serve_bound_caps_the_admission_queue_to_match(policy):
    cfg = parse_config({"router": {"policy": policy}, "replica": {"max_queued_requests": 100}})
    opts = llm_deployment_options(cfg)
    assert opts["max_queued_requests"] == 100
    assert queue_len(opts) == 100
    assert cfg.router.queue.max_len == 1024  # the config itself is left as written


@pytest.mark.parametrize("value", [-1, 5000])
def test_a_larger_or_unbounded_serve_bound_leaves_the_queue_length(value):
    cfg = parse_config(
        {"replica": {"max_queued_requests": value}, "router": {"queue": {"max_len": 64}}}
    )
    opts = llm_deployment_options(cfg)
    assert opts["max_queued_requests"] == value and queue_len(opts) == 64


def test_under_power_of_two_serves_own_bound_applies():
    opts = llm_deployment_options(parse_config({"router": {"policy": "power-of-two"}}))
    assert "request_router_config" not in opts
    assert opts["max_queued_requests"] == SERVE_MAX_QUEUED_REQUESTS
    cfg = parse_config(
        {"router": {"policy": "power-of-two"}, "replica": {"max_queued_requests": 8}}
    )
    assert llm_deployment_options(cfg)["max_queued_requests"] == 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_has_one_bound(path):
    cfg = load_config(path)
    opts = llm_deployment_options(cfg)
    if cfg.router.policy == "power-of-two":
        assert opts["max_queued_requests"] >= 1 or opts["max_queued_requests"] == -1
    else:  # Serve's bound never refuses before the admission queue is full
        bound = opts["max_queued_requests"]
        assert bound == -1 or bound >= queue_len(opts)


def test_zero_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match="max_queued_requests"):
        parse_config({"replica": {"max_queued_requests": 0}})


def test_the_removed_event_poll_interval_is_an_unknown_key():
    # KV events ride on the routing stats every stats_poll_interval_s; nothing polls them.
    with pytest.raises(ConfigError, match=r"router\.event_poll_interval_s.*unknown key"):
        parse_config({"router": {"event_poll_interval_s": 0.05}})
