#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (see README, "Performance"):
#   bash scripts/device_check.sh [OUT_DIR]
# 0. JPEGs decoded on the GPU (nvJPEG) against the CPU path: scores within 0.005, same error rows.
#    The GPU's bf16 rule (no agreement check there) against fp32 on the GPU, built-in model.
# 1. `loda benchmark speed` on CUDA, long enough for steady state: the pipeline's share of the
#    model-only throughput (target >= 80%) with nvJPEG decoding (the default on CUDA) and with
#    CPU decoding, then a short --compare-naive run for the ratio.
# 2. Training throughput of the paper's model (for the README's wall-time estimates).
set -uo pipefail
out=${1:-${OUT:-/tmp/loda-device}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LODA_HOME=${LODA_HOME:-/tmp/loda-home}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$out/gpu.txt"
python3 scripts/decode_agreement.py --device cuda --json "$out/decode-agreement.json" 2>&1 | tee "$out/decode-agreement.txt"
python3 scripts/precision_agreement.py --device cuda --precision auto --precision fp16 --json "$out/precision-agreement.json" 2>&1 | tee "$out/precision-agreement.txt"
python3 -m loda_cli benchmark speed --synthetic 960 --device cuda --batch-size 240 --workers 15 --json 2>&1 | tee "$out/speed.txt"
python3 -m loda_cli benchmark speed --synthetic 960 --device cuda --batch-size 240 --workers 15 --decode cpu --json 2>&1 | tee "$out/speed-cpu-decode.txt"
python3 -m loda_cli benchmark speed --synthetic 16 --compare-naive --device cuda --batch-size 240 --workers 12 2>&1 | tee "$out/naive.txt"
python3 scripts/train_throughput.py --device cuda --batch-size 128 --steps 30 2>&1 | tee "$out/train.txt"
