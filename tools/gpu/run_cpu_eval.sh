#!/usr/bin/env bash
# Runs on the GPU machine, on its CPU cores: the compression quality evaluation
# (tools/quality/evaluate.py) and the memory report (tools/quality/memory_report.py) against
# CPU kvtrim-servers from the bundle (the compressed KV cache runs on the CPU engine). Logs and
# results go to $OUT (default /tmp/kvtrim-eval).
#
# Carried, as for run_tests.sh: call 1 .gpu/bundle and .gpu/model_a, call 2 .gpu/model_b and
# .gpu/py (tools/gpu/python_deps.sh: grpcio and protobuf wheels, the generated stubs, the
# document). Results accumulate in /tmp/kvtrim-stage/eval across calls while the machine stays
# warm; each call works until TIME_BUDGET seconds (default 520) and then stops submitting, so
# the evaluation resumes in the next call where it stopped.
#
#   tools/gpu/run_cpu_eval.sh                       # memory report once, then the evaluation
#   SERVERS=4 EVAL_ARGS="--passkey-cases 50" tools/gpu/run_cpu_eval.sh
# Also SKIP_MEMORY=1, SKIP_EVAL=1.
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
with_bundle=(env "LD_LIBRARY_PATH=$bundle/lib:${LD_LIBRARY_PATH:-}")
document=$stage/py/document.txt

# start_server NAME PORT THREADS FLAGS...: a CPU kvtrim-server, its log in $out/NAME.log.
pids=()
start_server() {
  local name=$1 port=$2 threads=$3
  shift 3
  OMP_NUM_THREADS=$threads "${with_bundle[@]}" "$bundle/bin/kvtrim-server" --model "$model" \
    --device cpu --listen "127.0.0.1:$port" --metrics_port 0 --threads "$threads" "$@" \
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
if [[ -z ${SKIP_MEMORY:-} && ! -f $stage/eval/memory.md ]]; then
  # One server for the footprint (big pool), one with a 400 MiB pool for the capacity count.
  start_server footprint 50200 $((cores / 2)) --kv_pool_mib 4096 &&
    start_server capacity 50201 $((cores / 2)) --kv_pool_mib 400 &&
    python3 tools/quality/memory_report.py --server 127.0.0.1:50200 --document "$document" \
      --capacity-server 127.0.0.1:50201 --requests 24 --settle 15 --stubs "$stage/py/stubs" \
      >"$stage/eval/memory.md.partial" 2>"$out/memory_report.err" &&
    mv "$stage/eval/memory.md.partial" "$stage/eval/memory.md"
  note "memory report: $([[ -f $stage/eval/memory.md ]] && echo done || echo failed)" \
    "at $((SECONDS - started)) s"
  stop_servers
fi

if [[ -z ${SKIP_EVAL:-} ]]; then
  servers=${SERVERS:-4}
  threads=$((cores / servers))
  addresses=()
  for i in $(seq 0 $((servers - 1))); do
    start_server "eval$i" $((50210 + i)) "$threads" --kv_pool_mib 8192 &&
      addresses+=("127.0.0.1:$((50210 + i))")
  done
  left=$((budget - (SECONDS - started)))
  if ((left > 30)); then
    python3 tools/quality/evaluate.py --servers "$(IFS=,; echo "${addresses[*]}")" \
      --out "$stage/eval/results.jsonl" --document "$document" --stubs "$stage/py/stubs" \
      --time-budget "$left" ${EVAL_ARGS:-} >"$out/evaluate.log" 2>&1
    note "evaluate.py rc=$? after $((SECONDS - started)) s; $(wc -l <"$stage/eval/results.jsonl") results"
  fi
  stop_servers
fi
cp "$stage"/eval/* "$out/" 2>/dev/null
note "done in $((SECONDS - started)) s"
