#!/usr/bin/env bash
# kvtrim-server under load: CLIENTS concurrent kvtrim clients against one server, over a KV pool
# small enough that requests are preempted and wait, with a mix of what changes how a step runs:
# greedy, sampled, a repetition penalty, pyramidkv + ThinK prompts, CORM eviction, stop-free long
# generations, and clients that give up (--timeout) mid-stream. Dummy weights of --arch, so no
# model file travels. Checks, and exits 1 when one fails:
#   - every client exits 0, except those that gave up (they must end with "Deadline Exceeded");
#   - the server logs no error and is still serving (health) once the clients are done;
#   - /metrics: no request running or waiting and no pool page in use at the end, every request
#     counted as finished.
# Runs where the bundle's binaries run (the GPU machine, or here with DEVICE=cpu):
#
#   BIN=DIR [DEVICE=cuda] [ARCH=smollm2-135m] [CLIENTS=96] [POOL_MIB=256] [NEW=160]
#     [SERVER_FLAGS=...] tools/gpu/stress_server.sh
#
# DIR holds kvtrim-server and kvtrim (a staged bundle's bin/). Logs go to $OUT (default
# /tmp/kvtrim-stress).
set -uo pipefail

bin=${BIN:?BIN: the directory of kvtrim-server and kvtrim}
device=${DEVICE:-cuda}
arch=${ARCH:-smollm2-135m}
clients=${CLIENTS:-96}
pool_mib=${POOL_MIB:-256}
new=${NEW:-160}
out=${OUT:-/tmp/kvtrim-stress}
port=${PORT:-50093}
metrics_port=${METRICS_PORT:-9493}
mkdir -p "$out"
rm -f "$out"/client_*.log

"$bin/kvtrim-server" --load_format dummy --arch "$arch" --device "$device" \
  --listen "127.0.0.1:$port" --metrics_port "$metrics_port" --kv_pool_mib "$pool_mib" \
  --max_running 64 ${SERVER_FLAGS:-} >"$out/server.log" 2>&1 &
server=$!
trap 'kill -KILL $server 2>/dev/null' EXIT
for _ in $(seq 600); do
  "$bin/kvtrim" health --server "127.0.0.1:$port" >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "server exited:"; tail -20 "$out/server.log"; exit 1; }
  sleep 0.2
done

# A prompt of about 700 dummy tokens (text is tokenized byte by byte by the dummy tokenizer, up
# to its merges), different for each client.
prompt() { seq "$1" $(($1 + 180)) | tr '\n' ' '; }

began=$(date +%s.%N)
pids=()
for i in $(seq 0 $((clients - 1))); do
  flags=(--max_tokens $((new / 2 + (i * 37) % new)) --ignore_eos)
  case $((i % 8)) in
    0) ;;                                                                # greedy
    1) flags+=(--compression "policy=pyramidkv,budget_ratio=0.25,think.lambda=0.5,think.recent=8,think.rethin=1,eviction=window,window.sinks=4,window.recent=96") ;;
    2) flags+=(--temperature 0.8 --top_p 0.9 --seed "$i") ;;               # sampled
    3) flags+=(--temperature 0.7 --repetition_penalty 1.2 --seed "$i") ;;  # host-bound rows
    4) flags+=(--compression "policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5") ;;
    5) flags+=(--compression "eviction=corm,corm.window=16,corm.recent=16") ;;
    6) flags+=(--temperature 1.0 --top_k 40 --seed "$i" --max_tokens $((2 * new))) ;;
    7) flags+=(--timeout 1.5 --max_tokens 4000) ;;                         # gives up mid-stream
  esac
  "$bin/kvtrim" generate --server "127.0.0.1:$port" --prompt "$(prompt "$i")" "${flags[@]}" \
    >"$out/client_$i.log" 2>&1 &
  pids+=($!)
done
failed=0
gave_up=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  rc=$?
  if ((i % 8 == 7)); then
    if grep -aqiE "deadline.?exceeded" "$out/client_$i.log"; then
      gave_up=$((gave_up + 1))
    elif ((rc != 0)); then
      echo "client $i (gives up after 1.5 s) exited $rc: $(tail -1 "$out/client_$i.log")"
      failed=1
    fi
  elif ((rc != 0)); then
    echo "client $i exited $rc: $(tail -2 "$out/client_$i.log")"
    failed=1
  fi
done
ended=$(date +%s.%N)
sleep 1  # the server finishes what the clients that gave up left

if ! "$bin/kvtrim" health --server "127.0.0.1:$port" >/dev/null 2>&1; then
  echo "server not serving after the load"
  failed=1
fi
metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics', timeout=10).read().decode())")
value() { echo "$metrics" | awk -v name="$1" '$1 == name {print $2}'; }
for gauge in kvtrim_requests_running kvtrim_requests_waiting kvtrim_kv_pool_pages_used; do
  v=$(value $gauge)
  if [[ -z $v ]]; then
    echo "metric $gauge missing"
    failed=1
  elif [[ $v != 0 ]]; then
    echo "$gauge is $v after the load"
    failed=1
  fi
done
errors=$(grep -c '\[error\]' "$out/server.log")
if ((errors > 0)); then
  echo "server logged $errors errors:"
  grep '\[error\]' "$out/server.log" | head -5
  failed=1
fi
generated=$(grep -aho "[0-9]* generated" "$out"/client_*.log | awk "{n += \$1} END {print n + 0}")
preemptions=$(value kvtrim_preemptions_total)
echo "stress: $clients clients ($gave_up gave up), $generated tokens generated in" \
  "$(awk "BEGIN {printf \"%.1f\", $ended - $began}") s, preemptions ${preemptions:-?}, device $device," \
  "server flags: ${SERVER_FLAGS:-none}; $( ((failed)) && echo FAILED || echo passed)"
kill -TERM $server
wait $server
exit $failed
