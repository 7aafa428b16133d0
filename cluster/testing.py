"""Helpers for tests and benchmarks that start a local Ray cluster on this machine.

Ray binds its processes to the machine's network address, not loopback. `loopback_only()`
moves the calling process into a private network namespace where only `lo` is up (Linux,
root), so every byte a test cluster sends stays on 127.0.0.1; Ray processes started inside
inherit it. `isolated_ray_env()` points HOME at a temporary folder and turns Ray's token
authentication off (nothing is reachable from outside the namespace), so a test leaves no
`~/.ray/auth_token` behind. Fetch the default model *before* entering the namespace.

No ray or torch import here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000


def only_loopback() -> bool:
    """True when the only network interface is `lo`."""
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Run the body in a fresh network namespace with only loopback up; restore afterwards.

    Raises OSError where that is impossible (not root, no unshare). A process that already
    sees only `lo` is left where it is.
    """
    if only_loopback():
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET) failed: {os.strerror(err)} (needs root)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        try:
            yield
        finally:
            if libc.setns(old, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back to the host network failed: {os.strerror(err)}")
    finally:
        os.close(old)


@contextlib.contextmanager
def isolated_ray_env(home: str, **extra: str) -> Iterator[None]:
    """Environment for a throwaway local Ray cluster: HOME=home, token auth off, no usage stats.

    RAYFLEET_CACHE_DIR keeps pointing at the real model cache (resolved before HOME moves).
    """
    from rayfleet.engine import default_model_path

    model_dir = default_model_path()  # fetch (if needed) while the network is still there
    env = {
        "HOME": home,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAYFLEET_CACHE_DIR": os.path.dirname(model_dir),
        **extra,
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
