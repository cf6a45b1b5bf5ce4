#!/usr/bin/env bash
# Two `crosskv serve` replicas on the CPU behind sglang-router's cache-aware policy, all
# on loopback (docs/deployment.md): sends unrelated prompts together, then prompts sharing
# a long prefix one after another, and prints each replica's request count and prefix-cache hits after each part.
#
#   pip install sglang-router==0.3.2
#   bash scripts/router-demo.sh
#
# Environment knobs (defaults in brackets):
#   MODEL [crosskv's default model]  PORT [8000, the router]  WORKER_PORTS [8001 8002]
#   POLICY [cache_aware; round_robin for comparison]
#   PYTHON [python3]  CROSSKV_BIN [unset: `cargo build --release`, ./target/release/crosskv]
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-8000}
POLICY=${POLICY:-cache_aware}
read -r -a WORKER_PORTS <<<"${WORKER_PORTS:-8001 8002}"
PYTHON=${PYTHON:-python3}
if [ -z "${CROSSKV_BIN:-}" ]; then
    cargo build --release --quiet
    CROSSKV_BIN=${CARGO_TARGET_DIR:-target}/release/crosskv
fi
"$PYTHON" -c "import sglang_router.launch_router" 2>/dev/null ||
    { echo "sglang-router is not installed: pip install sglang-router==0.3.2" >&2; exit 1; }

logs=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

model_args=()
[ -n "${MODEL:-}" ] && model_args=(--model "$MODEL")
for p in "${WORKER_PORTS[@]}"; do
    CROSSKV_LOG=warn "$CROSSKV_BIN" serve --port "$p" "${model_args[@]}" --served-model-name demo \
        --kv-cache-memory 256MiB --max-model-len 1024 >"$logs/replica-$p.log" 2>&1 &
    pids+=($!)
done
urls=()
for p in "${WORKER_PORTS[@]}"; do
    urls+=("http://127.0.0.1:$p")
    for _ in $(seq 600); do
        curl -sf "127.0.0.1:$p/health" >/dev/null && break
        sleep 0.5
    done
    curl -sf "127.0.0.1:$p/health" >/dev/null || { echo "replica on $p did not start: $logs/replica-$p.log" >&2; exit 1; }
done
"$PYTHON" -m sglang_router.launch_router --host 127.0.0.1 --port "$PORT" --policy "$POLICY" \
    --prometheus-port $((PORT + 100)) --log-level warn --worker-urls "${urls[@]}" >"$logs/router.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    n=$(curl -sf "127.0.0.1:$PORT/workers" 2>/dev/null |
        "$PYTHON" -c 'import json,sys; print(sum(w["is_healthy"] for w in json.load(sys.stdin)["workers"]))' 2>/dev/null || echo 0)
    [ "$n" = "${#urls[@]}" ] && break
    sleep 0.3
done
echo "router ($POLICY) on 127.0.0.1:$PORT, replicas: ${urls[*]} (logs in $logs)"

complete() {
    local body
    body=$("$PYTHON" -c 'import json,sys; print(json.dumps({"model": "demo", "prompt": sys.argv[1], "max_tokens": 16, "temperature": 0}))' "$1")
    curl -sf "127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' -d "$body" >/dev/null
}
report() {
    echo "$1"
    for u in "${urls[@]}"; do
        curl -s "$u/metrics" | awk -v u="$u" '
            $1 == "crosskv_e2e_request_latency_seconds_count" { r = $2 }
            $1 == "crosskv_prefix_cache_hits_total" { h = $2 }
            END { printf "  %s  requests %d  prefix-cache hits (tokens) %d\n", u, r, h }'
    done
}

# Sent together: the router sends a prompt that matches no replica's history to the one
# with the fewest requests in flight.
together=()
for t in apples boats clouds dogs engines forests; do
    complete "$t are the subject of this short note about $t." &
    together+=($!)
done
wait "${together[@]}"
report "after 6 unrelated prompts sent together:"

prefix=$(printf 'The quarterly report of the northern lighthouse keepers, read aloud at the harbour meeting, described the storms of the season, the state of the lamps, the oil delivered by the supply boat, and the names of every ship that passed. %.0s' 1 2 3)
for q in "one: how many ships?" "two: which storms?" "three: how much oil?" "four: who read it?"; do
    complete "${prefix}Question $q"
done
report "after 4 prompts sharing a $(echo -n "$prefix" | wc -c)-character prefix:"
