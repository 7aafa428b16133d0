"""`rayfleet serve` end to end: a local Ray cluster, the default model, URLs, Ctrl-C.

Runs the real command in a subprocess inside a loopback-only network namespace (entered by
the test itself; needs root). Ray token auth is left to `rayfleet serve` (on, with a token
made for the run): the test checks that the dashboard wants it and that HOME stays empty.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


def test_rayfleet_serve_serves_the_default_model_and_stops_cleanly_on_ctrl_c(tmp_path):
    from rayfleet.cluster.testing import free_port, isolated_ray_env, loopback_only

    home = tmp_path / "home"
    home.mkdir()
    temp = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))  # AF_UNIX paths: <= 107 bytes
    try:
        net = loopback_only()
        net.__enter__()
    except OSError as e:
        pytest.skip(f"needs a private loopback-only network namespace: {e}")
    try:
        with isolated_ray_env(str(home)):
            env = dict(os.environ)
            for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                env.pop(k, None)  # rayfleet decides: token auth on, a token made for the run
            port = free_port()
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rayfleet.cluster.cli",
                    "serve",
                    "--port",
                    str(port),
                    "--temp-dir",
                    str(temp),
                    "--quiet",
                    "--set",
                    "engine.num_kv_blocks=64",
                    "--set",
                    "engine.max_model_len=256",
                ],  # fmt: skip
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            lines: list[str] = []
            reader = threading.Thread(
                target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
            )
            reader.start()
            try:
                deadline = time.monotonic() + 240
                while not any("Ctrl-C stops" in ln for ln in lines):
                    assert proc.poll() is None, "".join(lines)
                    assert time.monotonic() < deadline, "".join(lines)
                    time.sleep(0.5)
                out = "".join(lines)
                base = re.search(r"base URL\s+(\S+)", out).group(1)
                dashboard = re.search(r"dashboard\s+(http\S+)", out).group(1)
                metrics = re.search(r"metrics\s+(http\S+)", out).group(1)
                token = re.search(r"Ray auth token\s+([0-9a-f]{64})", out).group(1)
                assert base == f"http://127.0.0.1:{port}/v1"
                # The ingress serves `port` itself (direct ingress); Serve's proxy, on
                # another port, reaches the same app.
                proxy = re.search(r"Serve proxy\s+(http\S+)", out).group(1)
                assert proxy != base
                for url in (base, proxy):
                    assert (
                        httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code
                        == 200
                    )

                c = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
                assert c.models.list().data[0].id == "SmolLM2-135M-Instruct"
                r = c.chat.completions.create(
                    model="SmolLM2-135M-Instruct",
                    messages=[{"role": "user", "content": "Hi"}],
                    max_tokens=4,
                )
                assert r.usage.completion_tokens >= 1

                path = "/api/cluster_status"
                assert httpx.get(dashboard + path, timeout=10).status_code == 401
                ok = httpx.get(
                    dashboard + path, headers={"Authorization": f"Bearer {token}"}, timeout=10
                )
                assert ok.status_code == 200
                assert httpx.get(metrics, timeout=10).status_code == 200
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    # Serve drains replicas (up to its 20 s graceful timeout each) and Ray
                    # stops its processes: over a minute on a loaded 2-core machine.
                    rc = proc.wait(timeout=240)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    raise
                reader.join(5)
            assert rc == 0, "".join(lines)
            assert "stopped." in "".join(lines)
            deadline = time.monotonic() + 20
            while _processes_mentioning(str(temp)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _processes_mentioning(str(temp)) == []
            assert list(home.iterdir()) == []  # no ~/.ray/auth_token (nor anything else)
    finally:
        net.__exit__(None, None, None)
        shutil.rmtree(temp, ignore_errors=True)
