#!/usr/bin/env bash
# guidellm (second serving benchmark), offline against `dsv3 serve`: 4 concurrent streams,
# 20 synthetic requests of 64 prompt / 32 output tokens (chat content sent as text parts).
# usage: guidellm.sh MODEL_DIR [OUT_DIR]   env: VENV (default /tmp/venv-guidellm), PORT (18434)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=$(realpath "$1"); OUT=$(realpath -m "${2:-/tmp/dsv3-clients/guidellm}")
VENV=${VENV:-/tmp/venv-guidellm}; PORT=${PORT:-18434}
mkdir -p "$OUT" && cd "$OUT"   # guidellm writes benchmarks.json / benchmarks.csv to the working directory
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$HERE/offline.sh" "$MODEL_DIR" "$PORT" "$VENV/bin/guidellm" run \
  --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=dsv3" \
  --profile kind=concurrent,streams=4 --constraint kind=max_requests,count=20 \
  --tokenizer "kind=huggingface_auto,model=$MODEL_DIR" \
  --data kind=synthetic_text,prompt_tokens=64,output_tokens=32 --disable-console-interactive
