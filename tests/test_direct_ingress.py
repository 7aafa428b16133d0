"""Direct ingress settings (`cluster/direct_ingress.py`): when `rayfleet serve` turns it on,
the ports it asks Serve for, and that a test's use leaves the environment as it was. The
live behaviour (the ingress answering on its own port, every OpenAI endpoint through it) is
in test_serve_cli.py and test_serve_openai.py."""

from __future__ import annotations

import os

import pytest
from rayfleet.cluster import direct_ingress
from rayfleet.cluster.serve_env import FAST_PATH_VAR


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in (FAST_PATH_VAR, direct_ingress.ENABLE_VAR, direct_ingress.MIN_PORT_VAR):
        monkeypatch.delenv(k, raising=False)


def test_the_ingress_takes_the_server_port_and_the_proxy_another():
    p = direct_ingress.plan(8000, 8100)
    assert p.enabled and p.port == 8000 and p.proxy_port == 8100
    assert p.env[direct_ingress.ENABLE_VAR] == "1"
    # Serve's range is half-open: exactly the server port for one ingress replica.
    assert (p.env[direct_ingress.MIN_PORT_VAR], p.env[direct_ingress.MAX_PORT_VAR]) == (
        "8000",
        "8001",
    )
    assert direct_ingress.plan(8000, 8100, 3).env[direct_ingress.MAX_PORT_VAR] == "8003"


def test_a_proxy_port_inside_the_ingress_ports_is_refused():
    with pytest.raises(ValueError, match="8001 falls in the ingress ports 8000..8002"):
        direct_ingress.plan(8000, 8001, 3)


@pytest.mark.parametrize("how", ["fast path off", "turned off", "port 0"])
def test_otherwise_the_proxy_keeps_the_server_port(monkeypatch, how):
    if how == "fast path off":
        monkeypatch.setenv(FAST_PATH_VAR, "0")
    elif how == "turned off":
        monkeypatch.setenv(direct_ingress.ENABLE_VAR, "0")
    port = 0 if how == "port 0" else 8000
    p = direct_ingress.plan(port, 8100)
    assert not p.enabled and p.proxy_port == port and p.env == {}


def test_applied_sets_only_what_is_unset_and_restores_it(monkeypatch):
    monkeypatch.setenv(direct_ingress.MIN_PORT_VAR, "9000")
    p = direct_ingress.plan(8000, 8100)
    with p.applied():
        assert os.environ[direct_ingress.ENABLE_VAR] == "1"
        assert os.environ[direct_ingress.MIN_PORT_VAR] == "9000"  # the environment wins
    assert direct_ingress.ENABLE_VAR not in os.environ
    assert os.environ[direct_ingress.MIN_PORT_VAR] == "9000"


def test_free_port_is_bindable():
    import socket

    port = direct_ingress.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
