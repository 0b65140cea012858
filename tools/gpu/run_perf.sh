#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with a carried .gpu/bundle
# (tools/gpu/bundle.sh) and no model file: the performance measurements of the CUDA engine at the
# Llama-3-8B shape with dummy weights, in one call. Logs go to $OUT (default /tmp/kvtrim-perf):
#
#   limits      cuda_limits_bench: copy bandwidth, GEMM rate, engine kernels
#   torch       tools/gpu/torch_baselines.py: PyTorch copy, GEMM, SDPA decode and prefill on the GPU,
#               and transformers (bf16, SDPA, static cache) prefill and decode vs the roofline
#   decode      cuda_decode_attention_bench: paged decode, uncompressed vs compressed layouts
#   compress    cuda_compress_bench: the prompt compression kernels, one layer of an 8k prompt
#   prefill     cuda_prefill_attention_bench: prefill attention (torch: SDPA on the same shapes)
#   host        cuda_step_host_bench: the host's share of a decode step (this machine's CPU)
#   sample      cuda_sample_bench: temperature sampling on the device, 1 to 64 rows of 128256
#   serve       serve_bench --arch llama3.1-8b: REQUESTS x (PROMPT + NEW) tokens, uncompressed vs
#               pyramidkv 12% + ThinK 0.5: prefill tokens/s, decode step vs the roofline
#   capacity    kvtrim-server --arch llama3.1-8b with a POOL_GIB pool and memory_report.py: the
#               most concurrent PROMPT-token requests admitted, served to completion; POOL_GIB=auto
#               leaves the pool to --gpu-memory-utilization (GPU_MEMORY_UTILIZATION, 0.9), and
#               capacity-memory.log samples the device's memory.used every half second
# serve and capacity take llama3.1-8b, llama3-8b's shape with Llama 3.1's 131072-token context
# and rope scaling: llama3-8b's context of 8192 tokens holds no 8192-token prompt and its new
# tokens (every request would finish at once with nothing generated).
#
#   ONLY="limits torch decode compress prefill host sample serve" tools/gpu/run_perf.sh  # minutes
#   ONLY=capacity tools/gpu/run_perf.sh          # prefills every admitted 8k request: its own call
# Each program building the dummy 8B model makes 32 GB of fp32 host weights first (seconds on
# 16 cores) and uploads them as bf16.
# Also REQUESTS (32), PROMPT (8192), NEW (256), POOL_GIB (40), CAPACITY_REQUESTS (400),
# CAPACITY_COMPLETE (16: tokens each capacity request generates), CAPACITY_CONFIGS (memory_report.py's
# configuration names separated by ';', default all). The count is the pool's limit
# only if requests live until the pool fills: at about 14k prefill tokens/s, filling 40 GB with
# compressed 8k requests takes minutes, so raise CAPACITY_COMPLETE (and give capacity the whole
# call); memory_report.py says when the peak was not the pool's limit.
# The capacity step needs .gpu/py (tools/gpu/python_deps.sh) for grpcio.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
out=${OUT:-/tmp/kvtrim-perf}
stage=/tmp/kvtrim-stage
mkdir -p "$out" "$stage/py"
note() { echo "$*" | tee -a "$out/summary.txt"; }
source "$root/tools/gpu/stage.sh"
with_bundle=(env "LD_LIBRARY_PATH=$bundle/lib:${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64")
only=${ONLY:-limits torch decode compress prefill host sample serve capacity}
wants() { [[ " $only " == *" $1 "* ]]; }
requests=${REQUESTS:-32} prompt=${PROMPT:-8192} new=${NEW:-256}

# run NAME COMMAND...: runs, logs to $out/NAME.log, notes the exit status and time.
run() {
  local name=$1 start=$SECONDS
  shift
  "$@" >"$out/$name.log" 2>&1
  note "$(printf '%-10s rc=%-3d %4ds' "$name" "$?" "$((SECONDS - start))")"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory \
  --format=csv >"$out/device.txt" 2>&1
wants limits && run limits "${with_bundle[@]}" "$bundle/bin/cuda_limits_bench"
wants torch && run torch python3 tools/gpu/torch_baselines.py
wants decode && run decode "${with_bundle[@]}" "$bundle/bin/cuda_decode_attention_bench"
wants compress && run compress "${with_bundle[@]}" "$bundle/bin/cuda_compress_bench"
wants prefill && run prefill "${with_bundle[@]}" "$bundle/bin/cuda_prefill_attention_bench"
wants host && run host "${with_bundle[@]}" "$bundle/bin/cuda_step_host_bench"
wants sample && run sample "${with_bundle[@]}" "$bundle/bin/cuda_sample_bench"

# The copy rate the roofline divides by: cuda_limits_bench's cudaMemcpyAsync row when it ran.
copy_gbs=$(awk -F'|' '/^\| cudaMemcpyAsync D2D/ {gsub(/ /, "", $6); print $6; exit}' \
  "$out/limits.log" 2>/dev/null)
if wants serve; then
  run serve "${with_bundle[@]}" "$bundle/bin/serve_bench" --load_format dummy --arch llama3.1-8b \
    --device cuda --requests "$requests" --prompt_tokens "$prompt" --new_tokens "$new" \
    --pool_gib 60 --copy_gbs "${copy_gbs:-0}" \
    --specs 'none;policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5'
fi

if wants capacity; then
  tag=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  [[ -d .gpu/py ]] && cp -r .gpu/py/. "$stage/py/"
  for wheel in "$stage"/py/grpcio-*-"$tag"-*.whl "$stage"/py/protobuf-*.whl; do
    [[ -f $wheel && ! -d $stage/pylib/grpc ]] || continue
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$wheel" "$stage/pylib"
  done
  pool_mib=0
  [[ ${POOL_GIB:-40} == auto ]] || pool_mib=$((${POOL_GIB:-40} * 1024))
  nvidia-smi --query-gpu=timestamp,memory.used,memory.total --format=csv -lms 500 \
    >"$out/capacity-memory.log" 2>&1 &
  sampler=$!
  "${with_bundle[@]}" "$bundle/bin/kvtrim-server" --load_format dummy --arch llama3.1-8b \
    --device cuda --listen 127.0.0.1:50300 --metrics_port 0 \
    --kv_pool_mib "$pool_mib" --gpu_memory_utilization "${GPU_MEMORY_UTILIZATION:-0.9}" \
    --max_running 1024 --max_queued 4096 \
    --step_tokens 16384 >"$out/capacity-server.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    grep -q "listening on" "$out/capacity-server.log" && break
    sleep 0.5
  done
  PYTHONPATH=$stage/pylib run capacity python3 tools/quality/memory_report.py --capacity-only \
    --capacity-server 127.0.0.1:50300 --random-prompts --prompt-tokens "$prompt" \
    --requests "${CAPACITY_REQUESTS:-400}" --complete "${CAPACITY_COMPLETE:-16}" --stubs "$stage/py/stubs" \
    ${CAPACITY_CONFIGS:+--capacity-configs "$CAPACITY_CONFIGS"}
  kill -TERM "$server" && wait "$server"
  kill "$sampler"
  awk -F', ' 'NR > 1 && $2 + 0 > peak { peak = $2 + 0; total = $3 } END {
    printf "peak memory.used %d MiB of %d MiB (%.3f)\n", peak, total, peak / total }' \
    "$out/capacity-memory.log" | tee -a "$out/capacity.log"
fi
for log in "$out"/*.log; do
  echo "==== $(basename "$log")"
  tail -25 "$log"
done
