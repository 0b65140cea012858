#!/usr/bin/env bash
# Prepares what tools/gpu/run_eval.sh needs on the GPU machine, whose Python has no grpcio:
# for each CPython version X.Y given, .gpu/py-cpXY/ with the grpcio and protobuf wheels that
# tests/server/requirements.txt pins, Python stubs generated from proto/, and the evaluation's
# document (a text shipped with Debian). Carry the one matching the machine's Python as .gpu/py:
#
#   tools/gpu/python_deps.sh [PYTHON_WITH_GRPC_TOOLS] 3.11 3.12
#   mv .gpu/py-cp312 .gpu/py
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
python=${1:-$root/build/pyenv/bin/python}
shift || true
versions=("$@")
((${#versions[@]})) || versions=(3.10 3.11 3.12 3.13)
pin() { grep "^$1==" "$root/tests/server/requirements.txt" | cut -d= -f3; }
document=/usr/share/common-licenses/GPL-3

stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
"$python" -m grpc_tools.protoc -I"$root/proto" --python_out="$stubs" --grpc_python_out="$stubs" \
  "$root"/proto/kvtrim/v1/*.proto
for version in "${versions[@]}"; do
  dir=$root/.gpu/py-cp${version/./}
  rm -rf "$dir" && mkdir -p "$dir"
  for package in grpcio protobuf; do
    pip download --quiet --only-binary=:all: --no-deps --python-version "$version" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      "$package==$(pin "$package")" -d "$dir"
  done
  cp -r "$stubs" "$dir/stubs"
  cp "$document" "$dir/document.txt"
  echo "$dir: $(du -sh "$dir" | cut -f1)"
done
