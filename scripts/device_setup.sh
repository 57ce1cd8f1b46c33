# Sourced by the device checks (scripts/device_check*.sh) from the repo root: OUT made, the package
# installed into the machine's Python, torch and the card printed into $OUT/device.txt.
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python -m pip install -q --no-deps -e . >/dev/null
# a missing pure dependency can travel as a wheel in .whl/ (see the device README)
python -c "import yaml" 2>/dev/null || { python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site; }
amisbench() { python -P -m amisbench.cli "$@"; }
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
# the metrics' C kernels (amisbench/_counts.c): built by the install above where the machine has a C compiler
python -P -c "import amisbench.metrics as m; print('metrics C kernels:', m._C.kernel() if m._C else 'not built')" | tee -a "$OUT/device.txt"
