#!/usr/bin/env bash
# Side-by-side CPU benchmark: `crosskv bench` vs llama.cpp (llama-cpp-python) on the
# same GGUF, prompt, decode length and thread count.
#
#   bash scripts/bench-cpu.sh
#
# Environment knobs (defaults in brackets):
#   THREADS [2]  PROMPT_TOKENS [256]  DECODE_TOKENS [128]  ROUNDS [3]  PAIRS [2]
#   MODEL [crosskv's default GGUF: ${CROSSKV_CACHE:-~/.cache/crosskv}/SmolLM2-135M-Instruct.Q4_1.gguf]
#   PYTHON [python3]
#   CROSSKV_BIN [unset: `cargo build --release` and use ./target/release/crosskv]
#
# What it does:
#   1. installs llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION if absent (built from source
#      with CMAKE_ARGS="-DGGML_NATIVE=ON"; takes several minutes on 2 cores);
#   2. `cargo build --release` with RUSTFLAGS="-C target-cpu=native" unless RUSTFLAGS is
#      set (the published CPU figures were measured with this CPU's whole instruction set);
#   3. fetches the default GGUF if absent (`crosskv generate --prompt hi --max-tokens 1`);
#   4. runs the engines alternately, PAIRS times (crosskv, llama.cpp, crosskv, llama.cpp, ...)
#      so that drift and background load hit both alike; each run is a median of ROUNDS;
#   5. prints a markdown table (each run, then the median of the runs per engine) and the
#      crosskv/llama.cpp ratios.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36

cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
PROMPT_TOKENS=${PROMPT_TOKENS:-256}
DECODE_TOKENS=${DECODE_TOKENS:-128}
ROUNDS=${ROUNDS:-3}
PAIRS=${PAIRS:-2}
PYTHON=${PYTHON:-python3}
CACHE=${CROSSKV_CACHE:-$HOME/.cache/crosskv}
MODEL_SET_BY_USER=${MODEL:+1}
MODEL=${MODEL:-$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf}

log() { echo "[bench-cpu] $*" >&2; }

# 1. llama-cpp-python, pinned, built for this CPU.
have=$("$PYTHON" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true)
if [ "$have" != "$LLAMA_CPP_PYTHON_VERSION" ]; then
    log "installing llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (have: ${have:-none}); building from source, this takes minutes"
    pip_log=$(mktemp -t llama-cpp-python-build.XXXXXX.log)
    log "build log: $pip_log"
    if ! CMAKE_ARGS="-DGGML_NATIVE=ON" "$PYTHON" -m pip install --no-cache-dir \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$pip_log" 2>&1; then
        tail -n 40 "$pip_log" >&2
        log "pip install failed (full log: $pip_log)"
        exit 1
    fi
fi

# 2. crosskv release binary (CROSSKV_BIN=path skips the build, e.g. a binary built from a
#    clean checkout while the working tree has unfinished edits).
if [ -n "${CROSSKV_BIN:-}" ]; then
    CROSSKV=$CROSSKV_BIN
    log "using $CROSSKV (CROSSKV_BIN; no cargo build)"
else
    export RUSTFLAGS=${RUSTFLAGS:--C target-cpu=native}
    log "RUSTFLAGS=\"$RUSTFLAGS\" cargo build --release"
    cargo build --release >&2
    CROSSKV=./target/release/crosskv
fi

# 3. The GGUF.
if [ ! -f "$MODEL" ]; then
    if [ -n "${MODEL_SET_BY_USER:-}" ]; then log "model not found: $MODEL"; exit 1; fi
    log "fetching the default model"
    "$CROSSKV" generate --prompt hi --max-tokens 1 >/dev/null
fi
[ -f "$MODEL" ] || { log "model still not found: $MODEL"; exit 1; }

# 4. Alternate the engines.
out=$(mktemp -d -t bench-cpu.XXXXXX)
load_before=$(uptime | sed 's/.*load average: //')
log "load average before: $load_before"
# Sample the 1-minute load while the engines run: llama.cpp's thread barriers make it far
# more sensitive than crosskv to other processes taking a core, so say how busy it was.
( while sleep 2; do cut -d' ' -f1 /proc/loadavg; done >"$out/load.txt" ) &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
for i in $(seq 1 "$PAIRS"); do
    log "pair $i/$PAIRS: crosskv"
    RAYON_NUM_THREADS=$THREADS "$CROSSKV" bench --model "$MODEL" --prompt-tokens "$PROMPT_TOKENS" \
        --decode-tokens "$DECODE_TOKENS" --rounds "$ROUNDS" --json 2> >(sed 's/^/  crosskv: /' >&2) \
        | tail -n 1 >"$out/crosskv.$i.json"
    log "pair $i/$PAIRS: llama.cpp"
    "$PYTHON" benches/llamacpp_bench.py --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PROMPT_TOKENS" \
        --decode-tokens "$DECODE_TOKENS" --rounds "$ROUNDS" 2> >(sed 's/^/  llama.cpp: /' >&2) \
        | tail -n 1 >"$out/llamacpp.$i.json"
done
load_after=$(uptime | sed 's/.*load average: //')
kill "$sampler" 2>/dev/null || true
load_max=$(sort -g "$out/load.txt" 2>/dev/null | tail -n 1)
log "load average after: $load_after; highest 1-min load seen during the run: ${load_max:-?}"

# 5. The table.
"$PYTHON" - "$out" "$PAIRS" "$THREADS" "$PROMPT_TOKENS" "$DECODE_TOKENS" "$ROUNDS" "$MODEL" \
    "$load_before" "$load_after" "${load_max:-?}" "${CROSSKV_BIN:-}" <<'EOF'
import json, statistics, subprocess, sys
out, pairs, threads, p, d, rounds, model, lb, la, lmax, crosskv_bin = sys.argv[1:]
pairs = int(pairs)
runs = {e: [json.load(open(f"{out}/{e}.{i}.json")) for i in range(1, pairs + 1)] for e in ("crosskv", "llamacpp")}
names = {"crosskv": "crosskv", "llamacpp": "llama.cpp"}

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception:
        return ""

cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -n 1")
print(f"model: {model}")
print(f"machine: {cpu}, {sh('nproc')} vCPUs; threads: {threads}; prompt {p} tokens, decode {d} tokens, "
      f"median of {rounds} rounds per run, engines alternated {pairs}x")
lock = open("Cargo.lock").read().split("[[package]]")
candle = next((b.split('version = "')[1].split('"')[0] for b in lock if 'name = "candle-core"' in b), "?")
if crosskv_bin:
    ck = f"binary {crosskv_bin}"
else:
    dirty = " + uncommitted src changes" if sh("git status --porcelain src") else ""
    ck = f"working tree at {sh('git rev-parse --short HEAD')}{dirty}"
print(f"versions: crosskv ({ck}), {sh('rustc --version')}, candle-core {candle}, "
      f"llama-cpp-python {runs['llamacpp'][0].get('llama_cpp_python', '?')} (GGML_NATIVE=ON)")
print(f"load average (1, 5, 15 min): before {lb}; after {la}; highest 1-min load during the run: {lmax}")
# The engines' own threads account for a load of about THREADS.
if lmax != "?" and float(lmax) > int(threads) + 0.5:
    print(f"WARNING: the machine was busy during the run (1-min load up to {lmax} on {sh('nproc')} vCPUs); "
          "llama.cpp in particular slows down sharply when it cannot have all its threads, so re-run when idle")
print()
print("| engine | prompt tok/s | decode tok/s |")
print("|---|---|---|")
for i in range(pairs):
    for e in ("crosskv", "llamacpp"):
        r = runs[e][i]
        print(f"| {names[e]} (run {i + 1}) | {r['prompt_tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} |")
med = {e: {k: statistics.median(r[k] for r in runs[e]) for k in ("prompt_tok_per_s", "decode_tok_per_s")} for e in runs}
for e in ("crosskv", "llamacpp"):
    print(f"| **{names[e]} (median of runs)** | **{med[e]['prompt_tok_per_s']:.1f}** | **{med[e]['decode_tok_per_s']:.1f}** |")
rp = med["crosskv"]["prompt_tok_per_s"] / med["llamacpp"]["prompt_tok_per_s"]
rd = med["crosskv"]["decode_tok_per_s"] / med["llamacpp"]["decode_tok_per_s"]
print(f"| **ratio crosskv / llama.cpp** | **{rp:.2f}×** | **{rd:.2f}×** |")
print()
print(f"decode ratio {rd:.2f}× (goal ≥ 0.70×: {'met' if rd >= 0.7 else 'not met'}); prompt ratio {rp:.2f}×")
EOF
