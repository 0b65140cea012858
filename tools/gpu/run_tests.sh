#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, after tools/gpu/bundle.sh filled .gpu/ here:
# the CUDA parity tests (plainly, then under compute-sanitizer's memcheck), the CUDA benchmarks,
# and the PyTorch baselines (tools/gpu/torch_baselines.py). Logs go to $OUT (default
# /tmp/kvtrim-gpu): device.txt, one <binary>.log per program, summary.txt. Every program runs
# even when an earlier one fails; the exit status is non-zero when any test failed.
#
#   tools/gpu/run_tests.sh            # everything
#   SKIP_TORCH=1 SKIP_SANITIZER=1 tools/gpu/run_tests.sh   # or TORCH_ARGS=--small: a quick check
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
out=${OUT:-/tmp/kvtrim-gpu}
mkdir -p "$out"
if [[ ! -d .gpu/bin ]]; then
  echo "no .gpu/bin here: run tools/gpu/bundle.sh on the build machine and carry .gpu" >&2
  exit 1
fi

# Our binaries: bundled libraries first, cuBLAS from the machine's CUDA toolkit. Only for them:
# PyTorch keeps its own libraries.
with_bundle=(env "LD_LIBRARY_PATH=$root/.gpu/lib:${LD_LIBRARY_PATH:-}:/usr/local/cuda/lib64")
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"  # nvcc, compute-sanitizer
summary=$out/summary.txt
: >"$summary"
failed=0

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit \
    --format=csv
  nvidia-smi
  echo "kernel: $(uname -r)"
  ldd --version | head -1
  nvcc --version 2>/dev/null | tail -1
  cat .gpu/MANIFEST
  for binary in .gpu/bin/*; do
    echo "ldd $binary:"
    "${with_bundle[@]}" ldd "$binary" | grep -E 'not found|cublas|\.gpu/lib' | sed 's/^/  /'
  done
} >"$out/device.txt" 2>&1
head -3 "$out/device.txt"

# run NAME COMMAND...: runs, logs to $out/NAME.log, records the exit status.
run() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-3d %4ds\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
  return $rc
}

for test in .gpu/bin/*_test; do
  name=$(basename "$test")
  run "$name" "${with_bundle[@]}" "$test" --gtest_color=no || failed=1
  grep -E '^\[parity\]|FAILED|SKIPPED \]|PASSED' "$out/$name.log" | sed 's/^/  /'
  if [[ -z ${SKIP_SANITIZER:-} ]] && command -v compute-sanitizer >/dev/null; then
    # GEMMs are cuBLAS's own kernels; memcheck covers ours (odd shapes, scalar tails).
    run "$name.memcheck" "${with_bundle[@]}" compute-sanitizer --tool memcheck --error-exitcode 3 "$test" \
      --gtest_color=no --gtest_filter='-*Gemm*' || failed=1
    tail -3 "$out/$name.memcheck.log" | sed 's/^/  /'
  fi
done

for bench in .gpu/bin/*_bench; do
  run "$(basename "$bench")" "${with_bundle[@]}" "$bench"
  cat "$out/$(basename "$bench").log"
done

if [[ -z ${SKIP_TORCH:-} ]]; then
  # shellcheck disable=SC2086  # TORCH_ARGS is a list of flags, e.g. "--small"
  run torch_baselines python3 tools/gpu/torch_baselines.py ${TORCH_ARGS:-}
  cat "$out/torch_baselines.log"
fi

echo "---- summary"
cat "$summary"
exit $failed
