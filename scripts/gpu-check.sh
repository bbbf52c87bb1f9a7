#!/usr/bin/env bash
# The GPU check RESP keeps: run on a machine with one CUDA GPU (~80 GB or more) and a CUDA build
# of torch; RESP installed (pip install -e ".[test]" with your torch, or as below).
#
#   bash scripts/gpu-check.sh [OUT_DIR]        # default: gpu-check-<date>/
#
# Writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.log: scoring pass of a random Qwen3-8B-shaped
# bf16 model on 8 x 2048 tokens (tokens/s, MFU, peak memory vs respctl plan), 40%-compacted
# decode / prefill speedups, the plan of recipes/qwen3-8b-gsm8k-resp.yaml for this GPU, and the
# vLLM generator tests (the API check runs when vllm is installed).  About 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-check.log"
python scripts/gpu_check.py "$OUT/gpu-check.json" 2>&1 | tee -a "$OUT/gpu-check.log"
