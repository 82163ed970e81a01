#!/usr/bin/env bash
# evalscope perf (serving benchmark), offline against `dsv3 serve`.
# usage: evalscope_perf.sh MODEL_DIR [OUT_DIR]   env: VENV (default /tmp/venv-evalscope), PORT (18431)
# The random dataset needs a tokenizer directory: the model directory holds tokenizer.json + tokenizer_config.json.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=$(realpath "$1"); OUT=$(realpath -m "${2:-/tmp/dsv3-clients/evalscope_perf}")
VENV=${VENV:-/tmp/venv-evalscope}; PORT=${PORT:-18431}
export HF_HUB_OFFLINE=1 MODELSCOPE_OFFLINE=1
"$HERE/offline.sh" "$MODEL_DIR" "$PORT" "$VENV/bin/evalscope" perf \
  --url "http://127.0.0.1:$PORT/v1/chat/completions" --api openai --model dsv3 \
  --dataset random --tokenizer-path "$MODEL_DIR" \
  --min-prompt-length 64 --max-prompt-length 64 --min-tokens 32 --max-tokens 32 \
  --number 20 --parallel 4 --stream --outputs-dir "$OUT"
