#!/usr/bin/env bash
# offline.sh MODEL_DIR PORT CMD...
# Runs `dsv3 serve --model MODEL_DIR --port PORT` and then CMD inside a fresh network namespace that
# has only loopback (`unshare -n`, needs root): the client can reach 127.0.0.1 and nothing else, so
# any hub/CDN download fails at once. Exits with CMD's status; the server is always stopped.
# Extra server flags: DSV3_SERVE_ARGS="--max-num-seqs 8 ...". Server log: $DSV3_SERVE_LOG (default /tmp/dsv3-serve-PORT.log).
# The server command: $DSV3 (default `dsv3`; e.g. DSV3="python -m dsv3" for a checkout).
set -euo pipefail
MODEL_DIR=$1; PORT=$2; shift 2
LOG=${DSV3_SERVE_LOG:-/tmp/dsv3-serve-$PORT.log}
exec unshare -n bash -c '
  set -u
  ip link set lo up
  MODEL_DIR=$1; PORT=$2; LOG=$3; shift 3
  ${DSV3:-dsv3} serve --model "$MODEL_DIR" --port "$PORT" --served-model-name dsv3 ${DSV3_SERVE_ARGS:-} >"$LOG" 2>&1 &
  S=$!
  trap "kill $S 2>/dev/null; wait $S 2>/dev/null" EXIT
  for _ in $(seq 600); do
    curl -sf -o /dev/null "127.0.0.1:$PORT/health" && break
    kill -0 $S 2>/dev/null || { echo "dsv3 serve failed:"; tail -5 "$LOG"; exit 1; }
    sleep 0.2
  done
  "$@"
' offline "$MODEL_DIR" "$PORT" "$LOG" "$@"
