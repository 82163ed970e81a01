#!/usr/bin/env bash
# evalscope eval (general_mcq on a local CLUEWSC file), offline against `dsv3 serve`.
# usage: evalscope_eval.sh MODEL_DIR CLUEWSC_JSON [OUT_DIR]   env: VENV (default /tmp/venv-evalscope), PORT (18432)
# CLUEWSC_JSON: e.g. FewCLUE's cluewsc/dev_few_all.json (github.com/CLUEbenchmark/FewCLUE); converted to
# OUT_DIR/data/cluewsc_val.jsonl by cluewsc_to_mcq.py (evalscope reads {subset}_val.jsonl).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=$(realpath "$1"); SRC=$(realpath "$2"); OUT=$(realpath -m "${3:-/tmp/dsv3-clients/evalscope_eval}")
VENV=${VENV:-/tmp/venv-evalscope}; PORT=${PORT:-18432}
python "$HERE/cluewsc_to_mcq.py" "$SRC" "$OUT/data"
export HF_HUB_OFFLINE=1 MODELSCOPE_OFFLINE=1
"$HERE/offline.sh" "$MODEL_DIR" "$PORT" "$VENV/bin/evalscope" eval \
  --model dsv3 --api-url "http://127.0.0.1:$PORT/v1" --api-key EMPTY --eval-type openai_api \
  --datasets general_mcq \
  --dataset-args "{\"general_mcq\": {\"local_path\": \"$OUT/data\", \"subset_list\": [\"cluewsc\"], \"few_shot_num\": 0}}" \
  --generation-config '{"max_tokens": 8, "temperature": 0}' --eval-batch-size 4 --work-dir "$OUT"
