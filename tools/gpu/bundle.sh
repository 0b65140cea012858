#!/usr/bin/env bash
# Packs the built CUDA test and benchmark binaries, and the shared libraries they need that a
# bare GPU machine may lack, into .gpu/ (git-ignored) so they can travel to the device machine:
#
#   cmake -S . -B build-cuda -DCMAKE_BUILD_TYPE=Release
#   cmake --build build-cuda --target cuda_kernels_test cuda_limits_bench
#   tools/gpu/bundle.sh [build-cuda]       # then, on the GPU machine: tools/gpu/run_tests.sh
#
# Libraries are found with ldd. Left out: the C runtime (libc, libm, libdl, librt, libpthread,
# ld-linux), libstdc++ and libgcc_s (the GPU image's are newer, and an older copy ahead of them
# would break cuBLAS and PyTorch), and NVIDIA's own (libcuda, libcudart, libcublas, libcublasLt:
# the GPU machine has them, matched to its driver). Everything else (abseil, OpenBLAS and its
# gfortran, libgomp, pcre2, and gRPC, protobuf, spdlog, fmt, prometheus-cpp once a binary links
# them) is copied and stripped. The binaries are stripped too.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build-cuda}
[[ $build = /* ]] || build=$root/$build
out=$root/.gpu
limit_mib=48  # the working tree that travels is capped at 64 MiB, sources included

shopt -s nullglob
binaries=("$build"/tests/cuda_*_test "$build"/tests/cuda_*_bench)
if ((${#binaries[@]} == 0)); then
  echo "no CUDA test or bench binaries under $build/tests: build them first (see the top of $0)" >&2
  exit 1
fi

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+\.|libgcc_s\.|libcuda\.|libcudart\.|libcublas\.|libcublasLt\.|libnvidia-)'
declare -A copied=()
for binary in "${binaries[@]}"; do
  cp "$binary" "$out/bin/"
  strip --strip-unneeded "$out/bin/$(basename "$binary")"
  # "name => /path (address)"; a "not found" here would be missing on the GPU machine too.
  while read -r name arrow path _; do
    [[ $arrow == "=>" ]] || continue
    if [[ $path == "not" ]]; then
      echo "$(basename "$binary") needs $name, which ldd cannot find here" >&2
      exit 1
    fi
    [[ $name =~ $skip ]] && continue
    [[ -n ${copied[$name]:-} ]] && continue
    cp -L "$path" "$out/lib/$name"
    chmod u+w "$out/lib/$name"
    strip --strip-unneeded "$out/lib/$name"
    copied[$name]=1
  done < <(ldd "$binary")
done

{
  echo "built from: $(git -C "$root" rev-parse --short HEAD) (+ working tree), $(date -u +%FT%TZ)"
  echo "build dir: $build"
  echo "needs glibc >= $(objdump -T "$out"/bin/* "$out"/lib/* 2>/dev/null |
    grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
  echo "binaries: $(cd "$out/bin" && echo *)"
  echo "libraries: $(cd "$out/lib" && echo *)"
} >"$out/MANIFEST"
cat "$out/MANIFEST"

size_kib=$(du -sk "$out" | cut -f1)
echo "size of .gpu/: $((size_kib / 1024)) MiB ($size_kib KiB; limit $limit_mib MiB)"
if ((size_kib > limit_mib * 1024)); then
  echo ".gpu/ is over $limit_mib MiB: it would not travel with the working tree" >&2
  exit 1
fi
