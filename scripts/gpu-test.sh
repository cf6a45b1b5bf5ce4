#!/usr/bin/env bash
# The GPU test suite on a GPU machine, from the checkout root with .gpu/ (made by
# scripts/gpu-build.sh) beside it. Logs go to $OUT (default .gpu/out); a short summary
# is printed last.
#
#   scripts/gpu-test.sh          tests/gpu/, one test at a time (the CPU references use
#                                every core): every kernel against its CPU reference, a
#                                tiny CLA model on CUDA against the CPU, decode graphs
#                                against eager steps, the forward memory profile and, with
#                                two or more GPUs, tensor parallelism against one GPU.
#   scripts/gpu-test.sh serve    the commands end to end: train a small CLA2 model on the
#                                GPU, then generate and serve it (HTTP) at 1 and (with 2+
#                                GPUs) 2 ranks, whose greedy outputs must agree; and 24
#                                concurrent requests with decode graphs against
#                                --enforce-eager.
# shellcheck source=scripts/gpu-common.sh
source "$(dirname "$0")/gpu-common.sh"

gpu_tests() {
  unpack gpu-tests crosskv
  gpu_info "$out"
  nvidia-smi topo -m | tee -a "$out/gpu.txt" || true
  .gpu/crosskv --version 2>&1 | tee -a "$out/gpu.txt" || true
  set +e
  # One test at a time: the CPU references use every core.
  .gpu/gpu-tests --test-threads=1 --nocapture 2>&1 | tee "$out/gpu-tests.log"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "== summary =="
  grep -E '^test |^reshape_and_cache|^paged_attention|^rms_norm|^add_rms_norm|^rope|^argmax|^tiny CLA|^tensor parallelism|^NCCL|test result' \
    "$out/gpu-tests.log" | tail -n 120 | tee "$out/summary.txt"
  echo "gpu tests exit status: $rc"
  return "$rc"
}

# `serve`: the commands end to end on the GPU(s): a byte-level BPE tokenizer
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

case "${1:-all}" in
  all) gpu_tests ;;
  serve) device_serve "$out" ;;
  *) echo "usage: $0 [all|serve]" >&2; exit 2 ;;
esac
