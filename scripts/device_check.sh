#!/usr/bin/env bash
# One prepared GPU check (run on a CUDA machine from the repo root; OUT= a folder for the outputs).
# 1. CUDA code paths: metrics on CUDA, every method trains and samples on CUDA (smoke), bf16 autocast.
# 2. Table 3 protocol at paper scale (128 px, untrained weights): seconds for 100 samples per image.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || pip install -q --no-deps -e .
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python -m pytest -q -p no:cacheprovider tests/test_metrics.py -k "cuda or CUDA" 2>&1 | tail -2
R=$OUT/runs
for m in $(amisbench methods | awk '{print $1}'); do
  timeout 120 amisbench run --method "$m" --dataset synthetic --profile smoke --device cuda --results "$R" --quiet \
    >/dev/null 2>"$OUT/err_$m.txt" && echo "cuda smoke run ok: $m" || { echo "cuda smoke run FAILED: $m"; tail -3 "$OUT/err_$m.txt"; }
done
timeout 120 amisbench run --method atfm --dataset synthetic --profile smoke --device cuda --results "$R/amp" --quiet \
  --set train.default.amp=true --set eval.amp=true && echo "cuda bf16 autocast run ok: atfm"
amisbench table --dataset synthetic --results "$R" --profile smoke > "$OUT/smoke_cuda_table.md" 2>&1
# Table 3 timing at paper scale; float32 (TF32 off by default in torch) and bfloat16
for dt in float32 bfloat16; do
  timeout 240 amisbench timing --method "${TIMING_METHODS:-atfm,ssn,prob_unet,phiseg}" --dataset synthetic \
    --profile paper --untrained --device cuda --images "${IMAGES:-3}" --dtype $dt --results "$OUT/timing_$dt" 2>&1 | tail -20
done
timeout 200 amisbench timing --method ccdm --dataset synthetic --profile paper --untrained --device cuda --images 2 \
  --dtype bfloat16 --results "$OUT/timing_ccdm" 2>&1 | tail -8
