#!/usr/bin/env bash
# `make serve`: starts kvtrim-server on MODEL, waits until it is SERVING, asks it the sample chat
# question through the kvtrim client, then keeps serving until Ctrl-C / SIGTERM (which drain it).
#   tools/setup/serve.sh BUILD_DIR MODEL LISTEN METRICS_PORT
set -euo pipefail
build=$1 model=$2 listen=$3 metrics_port=$4
port=${listen##*:}
"$build/server/kvtrim-server" --model "$model" --listen "$listen" --metrics-port "$metrics_port" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
for _ in $(seq 1 300); do
  if "$build/tools/kvtrim" health --server "localhost:$port" >/dev/null 2>&1; then break; fi
  if ! kill -0 $server 2>/dev/null; then wait $server; exit $?; fi
  sleep 0.2
done
echo "> What is the capital of France?"
"$build/tools/kvtrim" generate --server "localhost:$port" --chat "What is the capital of France?" \
  --max-tokens 64
echo "kvtrim-server is serving on $listen (metrics on :$metrics_port/metrics); Ctrl-C stops it."
wait $server
