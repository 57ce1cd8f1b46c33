#!/usr/bin/env bash
# One prepared GPU check, run from the repo root on a CUDA machine (OUT= a folder for the outputs).
# 1. CUDA code paths: metrics on CUDA; every registered method trains and samples on CUDA (smoke
#    profile, in parallel); one run with bf16 autocast.
# 2. The Table 3 protocol at paper scale (128 px synthetic, untrained weights): seconds per 100 samples.
# 3. With QUICK=1: quick-profile runs of the methods in QUICK_METHODS (seeds 0..2) and their tables.
set -u
OUT=${OUT:-/tmp/device_check}
. scripts/device_setup.sh
R=$OUT/runs
( python -m pytest -q -p no:cacheprovider tests/test_metrics.py -k "cuda or CUDA" > "$OUT/pytest_cuda.txt" 2>&1 ) &
for m in $(amisbench methods | awk '{print $1}'); do
  ( timeout 150 python -P -m amisbench.cli run --method "$m" --dataset synthetic --profile smoke --device cuda --results "$R" --quiet \
      >/dev/null 2>"$OUT/err_$m.txt" && echo "cuda smoke run ok: $m" || { echo "cuda smoke run FAILED: $m"; tail -3 "$OUT/err_$m.txt"; } ) &
done
( timeout 150 python -P -m amisbench.cli run --method atfm --dataset synthetic --profile smoke --device cuda --results "$R/amp" --quiet \
  --set train.default.amp=true --set eval.amp=true 2>"$OUT/err_amp.txt" >/dev/null && echo "cuda bf16 autocast run ok: atfm" || echo "bf16 run FAILED" ) &
wait
tail -1 "$OUT/pytest_cuda.txt"
amisbench table --dataset synthetic --results "$R" --profile smoke > "$OUT/smoke_cuda_table.md" 2>&1
T="timeout ${TT:-100} python -P -m amisbench.cli timing --dataset synthetic --profile paper --untrained --device cuda"
$T --method atfm,ssn,prob_unet,phiseg,mose --images 3 --dtype float32 --results "$OUT/t32" 2>&1 | tail -12
$T --method atfm --images 3 --dtype bfloat16 --results "$OUT/tbf16" 2>&1 | tail -6
$T --method atfm --images 3 --dtype bfloat16 --compile --warmup 2 --results "$OUT/tcompile" 2>&1 | tail -6
$T --method ccdm,cimd,analog_bits --images 1 --dtype bfloat16 --results "$OUT/tdiff" 2>&1 | tail -8
# P2SAM's SAM ViT-B without the user's checkpoint (the same network, random weights: timing only)
$T --method p2sam --images 3 --dtype float32 --set method.sam_init=random --results "$OUT/tp2sam" 2>&1 | tail -5
# 3. QUICK=1: every method on synthetic at the quick profile, seeds 0..2, on this GPU (the grid's local
#    launcher, one worker per slot of GRID_SLOTS), then the synthetic tables; checkpoints are dropped.
if [ "${QUICK:-0}" = 1 ]; then
  Q=$OUT/quick
  OMP_NUM_THREADS=1 timeout "${TQ:-330}" python -P -m amisbench.cli grid --dataset synthetic --seeds 3 --profile quick \
    --method "${QUICK_METHODS:-unet,ssn,c_ssn,mose,cimd,cimd-x0,analog_bits,c_prob_unet,p2sam}" --launcher local \
    --devices "${GRID_SLOTS:-0,0,0,0,0,0,0,0,0,0,0,0}" --results "$Q" > "$OUT/quick_grid.log" 2>&1
  echo "quick grid exit $?"; tail -3 "$OUT/quick_grid.log"
  find "$Q" -type d -name ckpt -prune -exec rm -rf {} +
  for t in 1 2; do amisbench table --table $t --dataset synthetic --profile quick --results "$Q" > "$OUT/quick_table$t.md" 2>&1; done
  amisbench table --dataset synthetic --profile quick --results "$Q" > "$OUT/quick_all.md" 2>&1
  cat "$OUT/quick_all.md"
fi
