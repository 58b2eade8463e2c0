#!/usr/bin/env bash
# The main job: the service on its embedded defaults (127.0.0.1, Ray started in-process,
# SQLite under runs/demo/state), configs/demo.yaml submitted and watched to its end, then
# its summary and a plot (loss, accuracy, B̂ over time, faults marked) left in runs/demo/.
#
# Run from anywhere after `make setup` (`make demo` does both). The service is stopped when
# this script exits, however it exits. Environment:
#   ESGD_DEMO_PORT  port of the service (default 8000, or a free one if 8000 is taken)
# Exit code: 0 when the job succeeded, 1 when it did not, 2 when the service did not start.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=runs/demo
STATE="$OUT/state"
SERVER_LOG="$OUT/service.log"
# Starting Ray and the store takes a few seconds; 120 s leaves room on a loaded machine.
READY_TIMEOUT_S=120

if [[ ! -x "$BIN/elastic-sgd" ]]; then
    echo "error: $BIN/elastic-sgd not found: run \`make setup\` first (or \`make demo\`)" >&2
    exit 2
fi

# Embedded defaults: no cluster address, no inherited bind address or state directory.
unset RAY_ADDRESS ESGD_RAY_ADDRESS ESGD_HOST ESGD_PORT ESGD_STATE_DIR

port_free() {
    "$BIN/python" -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}
PORT="${ESGD_DEMO_PORT:-8000}"
if ! port_free "$PORT"; then
    taken="$PORT"
    PORT="$("$BIN/python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    echo "port $taken is taken; the service will listen on $PORT instead"
fi
URL="http://127.0.0.1:$PORT"
export ESGD_URL="$URL"
# Piped into a file or a CI log, the progress and event lines get 160 columns, not 80.
[[ -t 1 ]] || export COLUMNS="${COLUMNS:-160}"

echo "fresh demo state in $OUT/"
rm -rf "$OUT"
mkdir -p "$STATE"

SERVER_PID=""
stop_service() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "stopping the service (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        # uvicorn finishes in-flight requests (5 s), then Ray shuts down with the process
        for _ in $(seq 1 60); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_service EXIT
trap 'exit 130' INT TERM

echo "starting the service on $URL (log: $SERVER_LOG)"
"$BIN/elastic-sgd" serve --host 127.0.0.1 --port "$PORT" --state-dir "$STATE" \
    --log-level warning >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

if ! "$BIN/python" - "$URL" "$READY_TIMEOUT_S" "$SERVER_PID" <<'PY'; then
import os, sys, time
import httpx

url, timeout_s, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout_s
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the service exited while starting")
    try:
        if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.TransportError:
        pass
    time.sleep(0.5)
sys.exit(f"the service was not ready after {timeout_s:g} s")
PY
    echo "error: the service did not start; its log ($SERVER_LOG) ends with:" >&2
    tail -n 30 "$SERVER_LOG" >&2
    exit 2
fi
echo "service ready; dashboard at $URL/"

rc=0
"$BIN/elastic-sgd" submit configs/demo.yaml --watch --url "$URL" || rc=$?

JOB_ID="$("$BIN/python" -c 'import sys, httpx
jobs = httpx.get(sys.argv[1] + "/jobs", params={"limit": 1}, timeout=30).json()["items"]
print(jobs[0]["id"] if jobs else "")' "$URL")"
if [[ -z "$JOB_ID" ]]; then
    echo "error: the job was not submitted; see $SERVER_LOG" >&2
    exit 2
fi

"$BIN/python" scripts/plot_run.py "$JOB_ID" --out "$OUT" --url "$URL"
echo "job outputs (model.pt, metrics.jsonl, summary.json, checkpoints): $STATE/runs/$JOB_ID/"
if [[ "$rc" -ne 0 ]]; then
    echo "the demo job did not succeed (exit code $rc); see $OUT/summary.json and $SERVER_LOG" >&2
    exit 1
fi
