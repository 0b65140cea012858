#!/usr/bin/env bash
# Packs the built CUDA test and benchmark binaries, the kvtrim CLI and kvtrim-server (when built),
# and the shared libraries they need that a bare GPU machine may lack, into
# .gpu/bundle/bundle.tar.xz (git-ignored) so they can travel to the device machine; optionally
# splits the SmolLM2 GGUF into parts (model_a, model_b, ...) that travel in back-to-back calls:
#
#   cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release
#   cmake --build build-cuda --target cuda_kernels_test cuda_attention_test cuda_forward_test \
#     cuda_limits_bench kvtrim kvtrim-server kvtrim_device_fault
#   tools/gpu/bundle.sh [build-cuda] [--model PATH]
#
# Then, on the GPU machine (see run_tests.sh): the first call carries .gpu/bundle and
# .gpu/model_a, the second .gpu/model_b; run_tests.sh keeps what arrived under /tmp/kvtrim-stage,
# which outlives a call while the machine stays warm, and joins the model once both parts are
# there. Part sizes are chosen so that each call's working tree stays under the 64 MiB a call
# carries: part a fills what the bundle leaves of the first call.
#
# Libraries are found with ldd. Left out: the C runtime (libc, libm, libdl, librt, libpthread,
# ld-linux), libstdc++ and libgcc_s (the GPU image's are newer, and an older copy ahead of them
# would break cuBLAS and PyTorch), and NVIDIA's own (libcuda, libcudart, libcublas, libcublasLt:
# the GPU machine has them, matched to its driver). Everything else (abseil, OpenBLAS and its
# gfortran, libgomp, pcre2, gRPC, protobuf, OpenSSL, spdlog, fmt, prometheus-cpp) is copied and
# stripped. The binaries are stripped too. xz brings OpenBLAS's 35 MB to about 4.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build="build-cuda"
model=
while (($#)); do
  case $1 in
    --model) model=$2; shift 2 ;;
    *) build=$1; shift ;;
  esac
done
[[ $build = /* ]] || build=$root/$build
out=$root/.gpu
call_limit_kib=$((64 * 1024))
margin_kib=$((3 * 1024))  # room for source edits between bundling and the calls

shopt -s nullglob
binaries=("$build"/tests/cuda_*_test "$build"/tests/cuda_*_bench)
if ((${#binaries[@]} == 0)); then
  echo "no CUDA test or bench binaries under $build/tests: build them first (see the top of $0)" >&2
  exit 1
fi
for extra in "$build"/tools/kvtrim "$build"/server/kvtrim-server "$build"/tests/serve_bench; do
  [[ -x $extra ]] && binaries+=("$extra")
done

rm -rf "$out"/bundle "$out"/model_? "$out"/MANIFEST  # .gpu/py (python_deps.sh) stays
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/lib" "$out/bundle"
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+\.|libgcc_s\.|libcuda\.|libcudart\.|libcublas\.|libcublasLt\.|libnvidia-)'
declare -A copied=()
for binary in "${binaries[@]}"; do
  cp "$binary" "$stage/bin/"
  strip --strip-unneeded "$stage/bin/$(basename "$binary")"
  # "name => /path (address)"; a "not found" here would be missing on the GPU machine too.
  while read -r name arrow path _; do
    [[ $arrow == "=>" ]] || continue
    if [[ $path == "not" ]]; then
      echo "$(basename "$binary") needs $name, which ldd cannot find here" >&2
      exit 1
    fi
    [[ $name =~ $skip ]] && continue
    [[ -n ${copied[$name]:-} ]] && continue
    cp -L "$path" "$stage/lib/$name"
    chmod u+w "$stage/lib/$name"
    strip --strip-unneeded "$stage/lib/$name"
    copied[$name]=1
  done < <(ldd "$binary")
done
# Preloaded by tools/gpu/device_loss.sh; it needs nothing beyond the C and C++ runtimes.
if [[ -f $build/tests/libkvtrim_device_fault.so ]]; then
  cp "$build/tests/libkvtrim_device_fault.so" "$stage/lib/"
  strip --strip-unneeded "$stage/lib/libkvtrim_device_fault.so"
fi

{
  echo "built from: $(git -C "$root" rev-parse --short HEAD) (+ working tree), $(date -u +%FT%TZ)"
  echo "build dir: $build"
  echo "needs glibc >= $(objdump -T "$stage"/bin/* "$stage"/lib/* 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
  echo "binaries: $(cd "$stage/bin" && echo *)"
  echo "libraries: $(cd "$stage/lib" && echo *)"
} >"$stage/MANIFEST"
cp "$stage/MANIFEST" "$out/MANIFEST"
cat "$out/MANIFEST"
tar -C "$stage" -cf - MANIFEST bin lib | xz -T0 -6 >"$out/bundle/bundle.tar.xz"
bundle_kib=$(du -sk "$out/bundle" | cut -f1)
# What travels with every call besides the carried paths: tracked and untracked-not-ignored files.
tree_kib=$(($(cd "$root" && git ls-files -z --cached --others --exclude-standard |
  xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) / 1024))
echo "bundle: $((bundle_kib / 1024)) MiB ($bundle_kib KiB); working tree $((tree_kib / 1024)) MiB"
if ((bundle_kib + tree_kib + margin_kib > call_limit_kib)); then
  echo "the bundle and the working tree are over the 64 MiB a call carries" >&2
  exit 1
fi

if [[ -n $model ]]; then
  # Part a fills what the bundle (and .gpu/py, if there) leaves of call 1; parts b, c, ... fill
  # one call each.
  model_bytes=$(stat -c %s "$model")
  py_kib=0
  [[ -d $out/py ]] && py_kib=$(du -sk "$out/py" | cut -f1)
  first_kib=$((call_limit_kib - bundle_kib - py_kib - tree_kib - margin_kib))
  next_kib=$((call_limit_kib - tree_kib - margin_kib))
  offset=0
  letters=(a b c d)
  for i in "${!letters[@]}"; do
    ((offset < model_bytes)) || break
    size=$(( (i == 0 ? first_kib : next_kib) * 1024))
    part=$out/model_${letters[$i]}
    mkdir -p "$part"
    dd if="$model" of="$part/$(basename "$model").part_${letters[$i]}" bs=1024 \
      skip=$((offset / 1024)) count=$((size / 1024)) status=none
    echo "model part ${letters[$i]}: $(( $(stat -c %s "$part/$(basename "$model").part_${letters[$i]}") >> 20)) MiB (call $((i + 1)))"
    offset=$((offset + size))
  done
  if ((offset < model_bytes)); then
    echo "$model does not fit in ${#letters[@]} calls next to the bundle" >&2
    exit 1
  fi
fi
