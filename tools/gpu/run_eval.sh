#!/usr/bin/env bash
# Runs on the GPU machine: the compression quality evaluation (tools/quality/evaluate.py) and the
# memory report (tools/quality/memory_report.py) against kvtrim-servers from the bundle. With
# CUDA=1 one server runs on the GPU (--device cuda) and takes none and the snapkv, pyramidkv and
# streamingllm configurations (the decode-time stages on pyramidkv among them) and the memory
# report, while CPU servers on the machine's cores take corm and corm+pyramidkv-0.25, resuming the
# CPU engine's committed rows for them; without it, CPU servers take everything. Logs and results go to $OUT (default /tmp/kvtrim-eval).
#
# Carried, as for run_tests.sh: call 1 .gpu/bundle and .gpu/model_a, call 2 .gpu/model_b and
# .gpu/py (tools/gpu/python_deps.sh: grpcio and protobuf wheels, the generated stubs, the
# document). Results accumulate in /tmp/kvtrim-stage/eval across calls while the machine stays
# warm; each call works until TIME_BUDGET seconds (default 520) and then stops submitting, so
# the evaluation resumes in the next call where it stopped.
#
#   tools/gpu/run_eval.sh                       # memory report once, then the evaluation
#   SERVERS=4 EVAL_ARGS="--passkey-cases 50" tools/gpu/run_eval.sh
#   CUDA=1 SERVERS=4 tools/gpu/run_eval.sh      # results-cuda.jsonl (GPU) + results.jsonl (corm)
# Also SKIP_MEMORY=1, SKIP_EVAL=1, GPU_INFLIGHT (requests in flight on the GPU server, 32).
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
out=${OUT:-/tmp/kvtrim-eval}
stage=/tmp/kvtrim-stage
mkdir -p "$out" "$stage/model" "$stage/eval" "$stage/py"
started=$SECONDS
budget=${TIME_BUDGET:-520}
note() { echo "$*" | tee -a "$out/summary.txt"; }

source "$root/tools/gpu/stage.sh"
[[ -d .gpu/py ]] && cp -r .gpu/py/. "$stage/py/"
tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
note "$(date -u +%FT%TZ) python $tag, $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB"
if [[ ! -d $stage/pylib/grpc ]]; then
  for wheel in "$stage"/py/grpcio-*-"$tag"-*.whl "$stage"/py/protobuf-*.whl; do
    [[ -f $wheel ]] || continue
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$wheel" "$stage/pylib"
  done
fi
if [[ ! -f $model || ! -d $stage/pylib/grpc || ! -d $stage/py/stubs ]]; then
  note "not ready: model $([[ -f $model ]] && echo yes || echo no), grpc for $tag" \
    "$([[ -d $stage/pylib/grpc ]] && echo yes || echo no): carry .gpu/model_b and .gpu/py"
  exit 0
fi
export PYTHONPATH=$stage/pylib PYTHONUNBUFFERED=1
with_bundle=(env "LD_LIBRARY_PATH=$bundle/lib:${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64")
document=$stage/py/document.txt

# start_server NAME PORT THREADS FLAGS...: a CPU kvtrim-server (THREADS 0: on the GPU), its log
# in $out/NAME.log.
pids=()
start_server() {
  local name=$1 port=$2 threads=$3
  shift 3
  local device=(--device cpu --threads "$threads")
  ((threads == 0)) && device=(--device cuda)
  OMP_NUM_THREADS=$((threads > 0 ? threads : 1)) "${with_bundle[@]}" "$bundle/bin/kvtrim-server" \
    --model "$model" "${device[@]}" --listen "127.0.0.1:$port" --metrics_port 0 "$@" \
    >"$out/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    grep -q "listening on" "$out/$name.log" && return 0
    sleep 0.1
  done
  note "$name did not start: $(tail -3 "$out/$name.log")"
  return 1
}
stop_servers() {
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  wait 2>/dev/null
  pids=()
}
trap stop_servers EXIT

cores=$(nproc)
cuda=${CUDA:-}
if [[ -z ${SKIP_MEMORY:-} && ! -f $stage/eval/memory$cuda.md ]]; then
  # One server for the footprint (big pool), one with a 400 MiB pool for the capacity count.
  threads=$((cuda ? 0 : cores / 2))
  start_server footprint 50200 $threads --kv_pool_mib 4096 &&
    start_server capacity 50201 $threads --kv_pool_mib 400 &&
    python3 tools/quality/memory_report.py --server 127.0.0.1:50200 --document "$document" \
      --capacity-server 127.0.0.1:50201 --requests 24 --settle 15 --stubs "$stage/py/stubs" \
      >"$stage/eval/memory$cuda.md.partial" 2>"$out/memory_report.err" &&
    mv "$stage/eval/memory$cuda.md.partial" "$stage/eval/memory$cuda.md"
  note "memory report: $([[ -f $stage/eval/memory$cuda.md ]] && echo done || echo failed)" \
    "at $((SECONDS - started)) s"
  stop_servers
fi

# evaluate NAME SERVERS CONFIGS INFLIGHT: evaluate.py into $stage/eval/NAME.jsonl until the budget.
evaluate() {
  local left=$((budget - (SECONDS - started)))
  ((left > 30)) || return 0
  local configs=()
  [[ -n $3 ]] && configs=(--configs "$3")
  python3 tools/quality/evaluate.py --servers "$2" --out "$stage/eval/$1.jsonl" \
    --document "$document" --stubs "$stage/py/stubs" --time-budget "$left" --inflight "$4" \
    "${configs[@]}" ${EVAL_ARGS:-} >"$out/evaluate-$1.log" 2>&1
  note "evaluate.py $1 rc=$? after $((SECONDS - started)) s;" \
    "$(wc -l <"$stage/eval/$1.jsonl") rows"
}

if [[ -z ${SKIP_EVAL:-} ]]; then
  servers=${SERVERS:-4}
  threads=$((cores / servers))
  addresses=()
  for i in $(seq 0 $((servers - 1))); do
    start_server "eval$i" $((50210 + i)) "$threads" --kv_pool_mib 8192 &&
      addresses+=("127.0.0.1:$((50210 + i))")
  done
  cpu_servers=$(IFS=,; echo "${addresses[*]}")
  # The CPU engine's results resume the committed ones (same prompts: same seed and document).
  if [[ ! -f $stage/eval/results.jsonl && -f docs/quality-results.jsonl.gz ]]; then
    gunzip -c docs/quality-results.jsonl.gz >"$stage/eval/results.jsonl"
  fi
  if [[ -n $cuda ]]; then
    # The GPU takes the prompt-compression grid; the CPU servers the decode-time eviction.
    gpu_eval=
    if start_server gpu 50209 0 --kv_pool_mib 16384 --max_running 64 --step_tokens 8192; then
      evaluate results-cuda 127.0.0.1:50209 'none,snapkv-*,pyramidkv-*,streamingllm-*' \
        "${GPU_INFLIGHT:-32}" &
      gpu_eval=$!
    fi
    evaluate results "$cpu_servers" 'none,corm*' 2
    # That job only: a bare `wait` would also wait for the servers, which run until stopped.
    [[ -n $gpu_eval ]] && wait "$gpu_eval"
  else
    evaluate results "$cpu_servers" '' 2
  fi
  stop_servers
fi
cp "$stage"/eval/* "$out/" 2>/dev/null
note "done in $((SECONDS - started)) s"
