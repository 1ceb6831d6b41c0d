#!/usr/bin/env bash
# One-shot GPU check, at most ~8 minutes on one H100/H200: the GPU-only tests and the benchmarks that
# only mean something on a GPU, written to $OUT (default gpu_check/) as check.md and check.json.
#   tools/gpu_check.sh [out_dir]
# The GPU machines have PyTorch + CUDA preinstalled and no package registry: a virtual environment
# with --system-site-packages takes the system torch, and the other dependencies come as wheels from
# wheelhouse/ (build it where a registry is reachable: tools/gpu_wheels.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv --system-site-packages .venv-gpu
  if [ -d wheelhouse ]; then
    .venv-gpu/bin/pip install -q --no-index --find-links wheelhouse --no-deps wheelhouse/*.whl
  fi
  .venv-gpu/bin/pip install -q --no-index --no-deps --no-build-isolation -e . || true
fi
. .venv-gpu/bin/activate
export WANDB_MODE=disabled OMP_NUM_THREADS=4
python - <<'PY' | tee "$out/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
run() {  # run <name> <timeout s> <command...>: output to $out/<name>.txt, never stops the script
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/check.md"
  if timeout "$limit" "$@" > "$out/$name.txt" 2>&1; then echo "ok" >> "$out/check.md"; else echo "FAILED ($?)" >> "$out/check.md"; fi
  tail -n 30 "$out/$name.txt" | sed 's/^/    /' >> "$out/check.md"
}
run gpu_tests 120 pytest -q -m gpu tests
# Micro-batch 2: fp32 vs bf16, channels-last off vs on, and the reference's VAE-GAN update side by side.
run models_b2 150 python tools/bench.py models --presets reference --image-size 256 --batch 2 --iters 5 \
  --device cuda --channels-last off,on --stages vae-gan,ldm,vae-gan-ref
# Micro-batch 16 (fits both stages on 80 GB): eager vs compiled (train.compile), bf16 channels-last.
run models_b16 200 python tools/bench.py models --presets reference --image-size 256 --batch 16 --iters 3 \
  --device cuda --channels-last on --precisions bf16 --compile off,on
run cache 90 python tools/bench.py cache --presets reference --image-size 256 --batch 8 --iters 3 --warmup 1 \
  --repeats 2 --precision bf16 --device cuda
# The LDM step with model.unet.tx_los's and tx_detour's channels beside the plain one (at 256 the detour
# is H + W = 512 relaxations of a dozen small kernels per forward): the ratio is their cost in training.
run derived_channels 90 python tools/bench.py models --presets reference --image-size 256 --batch 16 --iters 3 \
  --device cuda --channels-last on --precisions bf16 --stages ldm,ldm-derived
run train 120 python tools/bench.py train --preset tiny --steps 12 --batch 8 --precisions autocast,bf16,fp32
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
json.dump({p.stem: p.read_text()[-20000:] for p in sorted(out.glob("*.txt"))}, open(out / "check.json", "w"), indent=1)
PY
echo "wrote $out/check.md and $out/check.json"
