#!/usr/bin/env bash
# Issue 16 device check (one GPU, about 10 minutes): the Table 3 protocol at paper scale (128 px synthetic
# images, untrained weights: sampling costs the same), ATFM and CCDM, float32 and bf16 autocast, our sampler
# beside the release's one-at-a-time loop timed in the same command (`amisbench timing --compare
# release_loop`), and training steps per second of every stage with and without bf16 autocast
# (`amisbench timing --train`); ATFM's CUDA graphs checked against eager sampling (scripts/check_cuda_graphs.py).
# Run from the repo root on a CUDA machine; outputs go to $OUT:
#   OUT=/tmp/speed bash scripts/device_check_speed.sh
# ATFM_IMAGES (default 5: the median of 5 images) and CCDM_IMAGES (default 1: its release loop is 25,000
# network calls per image, one at a time) set the images timed; TT and TT_CCDM the time limits in seconds.
set -u
OUT=${OUT:-/tmp/device_check_speed}
. scripts/device_setup.sh
T="python -P -m amisbench.cli timing --dataset synthetic --profile paper --untrained --device cuda"
for dtype in float32 bfloat16; do
  timeout "${TT:-240}" $T --method atfm --images "${ATFM_IMAGES:-5}" --dtype $dtype --compare release_loop --results "$OUT/atfm_$dtype" \
    > "$OUT/atfm_$dtype.md" 2> "$OUT/atfm_$dtype.err"; echo "atfm $dtype exit $?"; cat "$OUT/atfm_$dtype.md"
done
timeout "${TT_CCDM:-420}" $T --method ccdm --images "${CCDM_IMAGES:-1}" --dtype bfloat16 --compare release_loop --results "$OUT/ccdm_bfloat16" \
  > "$OUT/ccdm_bfloat16.md" 2> "$OUT/ccdm_bfloat16.err"; echo "ccdm bfloat16 exit $?"; cat "$OUT/ccdm_bfloat16.md"
# CUDA graphs of ATFM's Euler loop (method.cuda_graphs): same masks as eager, float32 and bf16, and the speed-up
timeout "${TT:-240}" python -P scripts/check_cuda_graphs.py > "$OUT/cuda_graphs.txt" 2>&1; echo "cuda graphs exit $?"
cat "$OUT/cuda_graphs.txt"
timeout "${TT:-240}" $T --method atfm --images "${ATFM_IMAGES:-5}" --dtype bfloat16 --set method.cuda_graphs=true \
  --compare release_loop --results "$OUT/atfm_graphs" > "$OUT/atfm_graphs.md" 2> "$OUT/atfm_graphs.err"
echo "atfm bfloat16 + cuda graphs exit $?"; cat "$OUT/atfm_graphs.md"
timeout "${TT:-240}" $T --method atfm,ccdm --train --steps "${TRAIN_STEPS:-5}" > "$OUT/train.md" 2> "$OUT/train.err"
echo "train exit $?"; cat "$OUT/train.md"
