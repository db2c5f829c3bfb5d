#!/usr/bin/env bash
# The benchmark on one GPU, in one go (16 case processes, 3 of them compiled): what a GPU
# gives the pipeline.
#   bash launch/gpu_benchmark.sh [OUT]      (OUT: runs/benchmark/gpu-<time>)
#
# 1. seed preset (the exercise sheet's model): the textbook code against the pipeline, full and
#    compacted vocabulary, the pipeline eager and compiled, generation with and without the KV cache;
# 2. gpt2_small preset (GPT-2 small's shape, 124M parameters, T 1,024): the textbook code against the
#    pipeline eager, compiled and with foreach AdamW, at full vocabulary.
# Each row's MFU is against the bf16 matmul peak the run measures on this GPU. Into OUT: each run's
# folder (benchmark.json, env.json) and log, and the machine's facts (torch.utils.collect_env,
# nvidia-smi). Offline, point TIKTOKEN_CACHE_DIR and TINYSHAKESPEARE_PATH at local copies first;
# PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/benchmark/gpu-$(date +%Y%m%d-%H%M%S)}
python=${PYTHON:-python}

"$python" -c "
import sys, torch
xpu = hasattr(torch, 'xpu') and torch.xpu.is_available()
if not (torch.cuda.is_available() or xpu):
    sys.exit('error: no GPU here (torch sees no CUDA or XPU device); launch/gpu_benchmark.sh measures one. '
             'On a CPU run recipes/benchmark.py itself (see the README, benchmark).')
"
mkdir -p "$out"
"$python" -m torch.utils.collect_env >"$out/collect_env.txt" 2>&1 || true
nvidia-smi >"$out/nvidia_smi.txt" 2>&1 || true

"$python" recipes/benchmark.py --preset seed --variants eager compiled \
  --out "$out/seed" 2>&1 | tee "$out/seed.log"
"$python" recipes/benchmark.py --preset gpt2_small --vocabs full --gen-tokens 0 \
  --variants eager compiled eager-foreach --out "$out/gpt2_small" 2>&1 | tee "$out/gpt2_small.log"
echo "gpu benchmark written to $out"
