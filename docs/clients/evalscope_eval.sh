#!/usr/bin/env bash
# evalscope eval of C-Eval, MMLU, GSM8K (built-in adapters) and CLUEWSC (general_mcq), offline against `dsv3 serve`.
# usage: evalscope_eval.sh MODEL_DIR DATA_DIR [OUT_DIR]
#   DATA_DIR holds the public releases: ceval/{dev,val}/SUBJECT_{dev,val}.csv, mmlu/{dev,test}/SUBJECT_{dev,test}.csv,
#   gsm8k/{test,train}.jsonl, cluewsc/dev_few_all.json (FewCLUE); a missing folder or file is left out.
#   env: VENV (default /tmp/venv-evalscope), PORT (18432), LIMIT (items per subset, default 20),
#        MAX_TOKENS (default 1024), GSM8K_TEST (default DATA_DIR/gsm8k/test.jsonl, else test_even.jsonl),
#        CLUEWSC (default DATA_DIR/cluewsc/dev_few_all.json), CEVAL_SUBJECTS / MMLU_SUBJECTS (comma lists; default
#        every subject present), DSV3 (the command that runs dsv3, default `dsv3`; e.g. "python -m dsv3")
# The built-in adapters give a local_path to Hugging Face `datasets.load_dataset(path, name=SUBSET, split=...)`,
# which cannot pick a subject out of the release's folder of CSV files: to_evalscope.py lays each dataset
# out as one config per subset with a dataset card that names its split files (see its docstring).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL_DIR=$(realpath "$1"); DATA=$(realpath "$2"); OUT=$(realpath -m "${3:-/tmp/dsv3-clients/evalscope_eval}")
VENV=${VENV:-/tmp/venv-evalscope}; PORT=${PORT:-18432}; LIMIT=${LIMIT:-20}; MAX_TOKENS=${MAX_TOKENS:-1024}
[ -f "$DATA/gsm8k/test.jsonl" ] || [ ! -f "$DATA/gsm8k/test_even.jsonl" ] || GSM8K_DEFAULT=$DATA/gsm8k/test_even.jsonl
GSM8K_TEST=${GSM8K_TEST:-${GSM8K_DEFAULT:-$DATA/gsm8k/test.jsonl}}; CLUEWSC=${CLUEWSC:-$DATA/cluewsc/dev_few_all.json}
names() { python -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"; }
[ -x "$VENV/bin/evalscope" ] || { echo "no evalscope in $VENV (python -m venv $VENV --system-site-packages && $VENV/bin/pip install evalscope)" >&2; exit 2; }
DATASETS=(); ARGS=()
if [ -d "$DATA/ceval" ]; then
  python "$HERE/to_evalscope.py" ceval "$DATA/ceval" "$OUT/data/ceval"
  SUBJ=$(names $(if [ -n "${CEVAL_SUBJECTS:-}" ]; then echo "$CEVAL_SUBJECTS" | tr , ' '; else cd "$OUT/data/ceval" && ls -d */ | tr -d /; fi))
  DATASETS+=(ceval); ARGS+=("\"ceval\": {\"local_path\": \"$OUT/data/ceval\", \"subset_list\": $SUBJ}")
fi
if [ -d "$DATA/mmlu" ]; then
  python "$HERE/to_evalscope.py" mmlu "$DATA/mmlu" "$OUT/data/mmlu"
  SUBJ=$(names $(if [ -n "${MMLU_SUBJECTS:-}" ]; then echo "$MMLU_SUBJECTS" | tr , ' '; else ls "$DATA/mmlu/test" | sed -n 's/_test\.csv$//p'; fi))
  DATASETS+=(mmlu); ARGS+=("\"mmlu\": {\"local_path\": \"$OUT/data/mmlu\", \"subset_list\": $SUBJ}")
fi
if [ -f "$GSM8K_TEST" ]; then
  python "$HERE/to_evalscope.py" gsm8k "$GSM8K_TEST" "$OUT/data/gsm8k" "$(dirname "$GSM8K_TEST")/train.jsonl"
  DATASETS+=(gsm8k); ARGS+=("\"gsm8k\": {\"local_path\": \"$OUT/data/gsm8k\"}")
fi
if [ -f "$CLUEWSC" ]; then
  python "$HERE/cluewsc_to_mcq.py" "$CLUEWSC" "$OUT/data/cluewsc"
  DATASETS+=(general_mcq)
  ARGS+=("\"general_mcq\": {\"local_path\": \"$OUT/data/cluewsc\", \"subset_list\": [\"cluewsc\"], \"few_shot_num\": 0}")
fi
[ ${#DATASETS[@]} -gt 0 ] || { echo "no dataset found under $DATA" >&2; exit 2; }
DATASET_ARGS="{$(IFS=,; echo "${ARGS[*]}")}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 MODELSCOPE_OFFLINE=1
"$HERE/offline.sh" "$MODEL_DIR" "$PORT" "$VENV/bin/evalscope" eval \
  --model dsv3 --api-url "http://127.0.0.1:$PORT/v1" --api-key EMPTY --eval-type openai_api \
  --datasets "${DATASETS[@]}" --dataset-args "$DATASET_ARGS" --limit "$LIMIT" \
  --generation-config "{\"max_tokens\": $MAX_TOKENS, \"temperature\": 0}" --eval-batch-size 4 --work-dir "$OUT"
