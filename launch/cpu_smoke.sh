#!/usr/bin/env bash
# A two-minute smoke test on any CPU: tokenize, then pretrain the tiny preset for a few steps,
# once in one process and once in two (DDP over gloo).
#   bash launch/cpu_smoke.sh            (writes under runs/smoke-*)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
stamp=$(date +%Y%m%d-%H%M%S)

python recipes/tokenize.py --preset tiny
accelerate launch --config_file launch/cpu.yaml recipes/pretrain.py \
  --preset tiny --max-steps 20 --out "runs/smoke-${stamp}/one"
accelerate launch --config_file launch/cpu_ddp.yaml recipes/pretrain.py \
  --preset tiny --max-steps 20 --train.micro-batch-size 2 --out "runs/smoke-${stamp}/two"
echo "smoke test passed: runs/smoke-${stamp}"
