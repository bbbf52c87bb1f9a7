#!/usr/bin/env bash
# An import-only vLLM for checking the names RESP's vLLM generator calls, on a machine without a
# GPU: the vllm wheel and the light packages its import needs, installed with --no-deps into one
# folder (no CUDA torch, nothing installed into the current environment).  About 1.3 GB.
#
#   bash scripts/vllm-api-env.sh [DIR] [VLLM_VERSION]        # default /tmp/vllm-api, vllm 0.33.0
#   RESP_VLLM_SITE=/tmp/vllm-api python -m pytest -q tests/test_vllm_generator.py -k every_vllm_name
#
# vllm's own modules import fine against a CPU torch for inspection (signatures, classes); no
# engine can start there.
set -euo pipefail
DIR="${1:-/tmp/vllm-api}"
SPEC="vllm==${2:-0.33.0}"  # the version the names were checked against here
mkdir -p "$DIR"
pip install -q --no-deps --target "$DIR" "$SPEC"
pip install -q --no-deps --target "$DIR" \
  cbor2 pyzmq openai-harmony openai msgspec pybase64 cachetools uvloop prometheus-client xgrammar \
  "apache-tvm-ffi==0.1.11" fastapi starlette opentelemetry-api opentelemetry-sdk \
  opentelemetry-semantic-conventions opentelemetry-semantic-conventions-ai partial-json-parser \
  llguidance einops sniffio distro jiter py-cpuinfo
PYTHONPATH="$DIR" python -c "import vllm; from vllm import LLM, SamplingParams; print('vllm', vllm.__version__, 'imports from', '$DIR')"
