#!/usr/bin/env bash
# kvtrim-server when its GPU fails: libkvtrim_device_fault.so (tests/server/device_fault.cu),
# preloaded into the server, makes the device fail when told to. Dummy weights of --arch, so no
# model file travels. Four cases, one server each:
#   busy: CLIENTS streaming requests are decoding when a kernel writes to address 16, which loses
#         the process's CUDA context as a fault in one of the engine's kernels or an
#         uncorrectable ECC error would; every client must end with UNAVAILABLE, naming the
#         device's error, and the server must log that the device failed;
#   idle: the same with no request running; the server must find it without one;
#   hang: CLIENTS streaming requests are decoding when blocks that never return take every SM,
#         so the step in flight never ends; with --step-timeout 5s the server must log that the
#         device does not respond, and every client must end with UNAVAILABLE;
#   idle-hang: the same with no request running; the server's idle probe must find it.
# In every case the server must stop without hanging and exit 1 (within 60 s), so that its
# supervisor (Kubernetes, systemd, Docker's restart policy) starts a fresh one. Also printed: the
# first health check after the fault that did not answer SERVING. Runs where the bundle's
# binaries run (the GPU machine); exits 1 when a check fails:
#
#   BIN=DIR LIB=DIR [ARCH=smollm2-135m] [CLIENTS=8] [CASES="busy idle hang idle-hang"] tools/gpu/device_loss.sh
#
# DIR holds kvtrim-server and kvtrim (a staged bundle's bin/), LIB libkvtrim_device_fault.so
# (its lib/). Logs go to $OUT/<case> (default /tmp/kvtrim-device-loss).
set -uo pipefail

bin=${BIN:?BIN: the directory of kvtrim-server and kvtrim}
lib=${LIB:?LIB: the directory of libkvtrim_device_fault.so}
arch=${ARCH:-smollm2-135m}
clients=${CLIENTS:-8}
port=${PORT:-50095}
failed=0
server=
trap '[[ -n $server ]] && kill -KILL $server 2>/dev/null' EXIT

run_case() {
  local case=$1 out=${OUT:-/tmp/kvtrim-device-loss}/$1 case_failed=0
  fail() {
    echo "$case: $*"
    case_failed=1
  }
  mkdir -p "$out"
  rm -f "$out"/*.log "$out/fault"
  local mode=lost injected="device_fault: wrote to address 16" logged="the device failed"
  if [[ $case = *hang ]]; then
    mode=hang injected="device_fault: .* spinning" logged="the device does not respond"
  fi
  LD_PRELOAD="$lib/libkvtrim_device_fault.so" KVTRIM_DEVICE_FAULT_FILE="$out/fault" \
    KVTRIM_DEVICE_FAULT_MODE=$mode \
    "$bin/kvtrim-server" --load_format dummy --arch "$arch" --device cuda \
    --listen "127.0.0.1:$port" --metrics_port 0 --max_new_tokens 1000000 --drain_timeout 30s \
    --step_timeout 5s >"$out/server.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do
    "$bin/kvtrim" health --server "127.0.0.1:$port" >/dev/null 2>&1 && break
    kill -0 $server 2>/dev/null || {
      echo "$case: server exited:"
      tail -20 "$out/server.log"
      return 1
    }
    sleep 0.2
  done

  local pids=() i waiting=0
  if [[ $case != idle* ]]; then
    for i in $(seq 0 $((clients - 1))); do
      # Until the context is full: far longer than the test.
      local flags=(--max_tokens 1000000 --ignore_eos)
      ((i % 2)) && flags+=(--compression "policy=pyramidkv,budget_ratio=0.25,think.lambda=0.5")
      "$bin/kvtrim" generate --server "127.0.0.1:$port" --prompt "$(seq "$i" $((i + 300)))" \
        "${flags[@]}" >"$out/client_$i.log" 2>&1 &
      pids+=($!)
    done
    # Every client has tokens back before the fault.
    for _ in $(seq 300); do
      waiting=0
      for i in $(seq 0 $((clients - 1))); do
        [[ -s $out/client_$i.log ]] || waiting=1
      done
      ((waiting)) || break
      sleep 0.1
    done
    ((waiting)) && fail "some clients had no tokens after 30 s"
  else
    sleep 2
  fi

  touch "$out/fault"
  local faulted ended health_seen= stopped= rc
  faulted=$(date +%s.%N)
  for _ in $(seq 600); do
    if ! kill -0 $server 2>/dev/null; then
      stopped=1
      break
    fi
    if [[ -z $health_seen ]] && ! "$bin/kvtrim" health --server "127.0.0.1:$port" \
      >"$out/health.log" 2>&1; then
      health_seen=1
    fi
    sleep 0.1
  done
  if [[ -z $stopped ]]; then
    fail "server still running 60 s after the fault"
    kill -KILL $server
  fi
  wait $server
  rc=$?
  ended=$(date +%s.%N)
  ((rc == 1)) || fail "server exited $rc, not 1"
  grep -q "$injected" "$out/server.log" || fail "the fault was not injected"
  grep -q "$logged" "$out/server.log" || fail "server did not log \"$logged\""
  local unavailable=0 crc
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    crc=$?
    if ((crc == 0)); then
      fail "client $i exited 0"
    elif grep -aq "UNAVAILABLE" "$out/client_$i.log"; then
      unavailable=$((unavailable + 1))
    else
      fail "client $i exited $crc without UNAVAILABLE: $(tail -1 "$out/client_$i.log")"
    fi
  done
  echo "$case: server log after the fault:"
  grep -aE "device_fault|error|warn|stopp|drain|respond" "$out/server.log" | grep -v "chat template" |
    cut -c1-300 | sed 's/^/  /'
  ((${#pids[@]})) && echo "$case: a client's end: $(tail -1 "$out/client_0.log" | cut -c1-300)"
  [[ -n $health_seen ]] && echo "$case: health after the fault: $(tail -1 "$out/health.log" | cut -c1-200)"
  echo "device loss, $case: ${#pids[@]} clients, $unavailable ended UNAVAILABLE; server exit $rc," \
    "$(awk "BEGIN {printf \"%.2f\", $ended - $faulted}") s after the fault; arch $arch;" \
    "$( ((case_failed)) && echo FAILED || echo passed)"
  return $case_failed
}

for case in ${CASES:-busy idle hang idle-hang}; do
  run_case "$case" || failed=1
done
exit $failed
