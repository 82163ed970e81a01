#!/usr/bin/env bash
# lm-eval local-completions on a log-likelihood multiple-choice task (CLUEWSC, A/B), offline.
# usage: lmeval_loglikelihood.sh MODEL_DIR CLUEWSC_JSON [OUT_DIR]   env: VENV (default /tmp/venv-lmeval), PORT (18433)
# No client-side tokenizer: lm-eval's default tokenizer_backend=auto finds the server's vLLM-style
# /tokenizer_info, /tokenize and /detokenize. Each request is a batch of token-id prompts with
# echo=true, logprobs=1, max_tokens=1; the server returns one logprob per prompt token.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=$(realpath "$1"); SRC=$(realpath "$2"); OUT=$(realpath -m "${3:-/tmp/dsv3-clients/lmeval}")
VENV=${VENV:-/tmp/venv-lmeval}; PORT=${PORT:-18433}
python "$HERE/cluewsc_to_mcq.py" "$SRC" "$OUT/data"
mkdir -p "$OUT/tasks"
cat > "$OUT/tasks/cluewsc_local.yaml" <<YAML
task: cluewsc_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: $OUT/data/cluewsc_val.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}\n答案："
doc_to_choice: "{{[A, B]}}"
doc_to_target: "{{['A', 'B'].index(answer)}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 1.0}
YAML
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$HERE/offline.sh" "$MODEL_DIR" "$PORT" "$VENV/bin/lm-eval" run --model local-completions --batch_size 4 \
  --model_args "model=dsv3,base_url=http://127.0.0.1:$PORT/v1/completions,num_concurrent=1,max_retries=1" \
  --tasks cluewsc_local --include_path "$OUT/tasks" --output_path "$OUT/results"
