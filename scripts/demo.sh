#!/usr/bin/env bash
# The README's main command (`make demo`): start `megamoe serve` on its embedded defaults
# (a private etcd, the local executor), submit configs/tiny.toml as 2 nodes x 1 process
# through the job API, watch it to the end, print the final loss and where the summary
# is, and stop the service. Every step is a command a user can run by hand.
set -euo pipefail

BIN=${BIN:-.venv/bin}
STATE=${STATE:-runs/service}
read -r -a EXTRA <<<"${DEMO_ARGS:-}"  # more `job submit` arguments (the tests shorten the run)
mkdir -p "$STATE"
LOG="$STATE/serve.log"

"$BIN/megamoe" serve --port 0 --state-dir "$STATE" >"$LOG" 2>&1 &
SERVE=$!
stop_service() {
    if kill -0 "$SERVE" 2>/dev/null; then
        kill -TERM "$SERVE"
        wait "$SERVE" || true
        echo "demo: service stopped (its log: $LOG)"
    fi
}
trap stop_service EXIT

for _ in $(seq 1200); do  # up to 2 minutes for the first start (etcd, imports)
    grep -q "serving on" "$LOG" && break
    if ! kill -0 "$SERVE" 2>/dev/null; then
        cat "$LOG" >&2
        echo "demo: megamoe serve exited before serving" >&2
        exit 1
    fi
    sleep 0.1
done
ADDRESS=$(grep -o "serving on [^ ]*" "$LOG" | head -n 1 | cut -d" " -f3)
if [ -z "$ADDRESS" ]; then
    echo "demo: megamoe serve did not say where it serves; see $LOG" >&2
    exit 1
fi
echo "demo: megamoe serve is up on $ADDRESS (state in $STATE)"

JOB=$("$BIN/megamoe" job submit --server "$ADDRESS" --config configs/tiny.toml \
    --nodes 2 --procs-per-node 1 --set parallel.n=2 "${EXTRA[@]}" --json |
    "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin)["job_id"])')
echo "demo: submitted $JOB (configs/tiny.toml, 2 nodes x 1 process); watching it"

status=0
"$BIN/megamoe" job watch "$JOB" --server "$ADDRESS" || status=$?
"$BIN/megamoe" job get "$JOB" --server "$ADDRESS" --json >"$STATE/$JOB.json"
"$BIN/python" - "$STATE/$JOB.json" <<'PY'
import json
import sys

job = json.load(open(sys.argv[1]))
if job["state"] == "SUCCEEDED":
    print(f"demo: {job['job_id']} SUCCEEDED after {job['step']} steps, "
          f"final loss {job['final_loss']:.4f}")
    print(f"demo: summary at {job['summary_path']}")
else:
    print(f"demo: {job['job_id']} ended {job['state']}: {job['message']}")
PY
exit "$status"
