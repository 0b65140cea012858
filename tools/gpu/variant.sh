#!/usr/bin/env bash
# Builds one program again with one CUDA or C++ source of the engine library taken from another
# revision, so that a change can be measured against what it replaces side by side, in one call
# on the GPU machine:
#
#   tools/gpu/variant.sh [--build DIR] [--name NAME] [--flags FLAGS] REV SOURCE TARGET...
#   tools/gpu/variant.sh HEAD~1 engine/cuda/attention_prefill.cu cuda_prefill_attention_bench
#
# REV may also be file:PATH, a file standing in for SOURCE (a variant not committed anywhere,
# such as one tile size of a kernel against another). FLAGS are added to the compile line: with
# --flags -lineinfo and REV HEAD, a profiler can put a kernel's stalls on its source lines.
#
# SOURCE (a file of engine/, built into kvtrim_cuda or kvtrim_engine) is compiled at REV with the
# build's own flags, replaces its object in a copy of that library, and each TARGET (a program of
# tests/, already built in DIR, default build) is relinked against the copy as
# DIR/variants/<TARGET with NAME before its last "_" part> — with the default NAME "before",
# cuda_prefill_attention_bench becomes cuda_prefill_attention_before_bench, which
# tools/gpu/bundle.sh packs with the others once it sits in a tests/ folder it is given:
#
#   mkdir -p /tmp/b/tests && ln -s "$PWD"/build/tests/cuda_prefill_attention_bench \
#     "$PWD"/build/variants/cuda_prefill_attention_before_bench /tmp/b/tests/
#   tools/gpu/bundle.sh /tmp/b
#
# Only the library's object is swapped: headers at REV are not used, so SOURCE must still compile
# against today's headers (a kernel's body, not its interface).
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
build=$root/build
name=before
extra_flags=
while (($#)); do
  case $1 in
    --build) build=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --flags) extra_flags=$2; shift 2 ;;
    *) break ;;
  esac
done
if (($# < 3)); then
  sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
rev=$1 source=$2
shift 2
[[ $build = /* ]] || build=$root/$build
cd "$root"

# Which library builds SOURCE, and the rule that compiles it.
object=
for library in kvtrim_cuda kvtrim_engine; do
  make_file=$build/engine/CMakeFiles/$library.dir/build.make
  [[ -f $make_file ]] || continue
  candidate="engine/CMakeFiles/$library.dir/${source#engine/}.o"
  if grep -q "^$candidate: $root/$source\$" "$make_file"; then
    object=$candidate lib=$library
    break
  fi
done
if [[ -z $object ]]; then
  echo "$source is not a source of kvtrim_cuda or kvtrim_engine in $build" >&2
  exit 1
fi
# The compile line of the object: the first command after its rule, with make's variables.
flags_file=$build/engine/CMakeFiles/$lib.dir/flags.make
command=$(awk -v rule="$object: $root/$source" '
  index($0, rule) == 1 { found = 1; next }
  found && /^\t/ && !/cmake_echo_color/ { sub(/^\t/, ""); print; exit }' \
  "$build/engine/CMakeFiles/$lib.dir/build.make")
[[ -n $command ]] || { echo "no compile rule for $object" >&2; exit 1; }

out=$build/variants
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
# The source at REV, under a name of its own beside today's (same directory: same includes).
variant_source=$root/$(dirname "$source")/.variant_$(basename "$source")
if [[ $rev == file:* ]]; then
  cp "${rev#file:}" "$variant_source"
else
  git show "$rev:$source" >"$variant_source"
fi
trap 'rm -rf "$work" "$variant_source"' EXIT
variant_object=$work/$(basename "$object")
# make's $(VAR) from flags.make, the paths swapped for the variant's.
expanded=$command
while read -r var _ value; do
  expanded=${expanded//"\$($var)"/$value}
done < <(grep -E '^[A-Z_]+ = ' "$flags_file")
expanded=${expanded//"$root/$source"/$variant_source}
expanded=$(sed -E "s# -o [^ ]+# -o $variant_object#; s# -MD -MT [^ ]+ -MF [^ ]+##; s# -MD -MT [^ ]+##" \
  <<<"$expanded")
[[ -n $extra_flags ]] && expanded="$expanded $extra_flags"
echo "compiling $source at $rev${extra_flags:+ with $extra_flags}"
(eval "$expanded")

cp "$build/engine/lib$lib.a" "$work/lib$lib.a"
(cd "$work" && ar r "lib$lib.a" "$(basename "$object")")

for target in "$@"; do
  link=$build/tests/CMakeFiles/$target.dir/link.txt
  [[ -f $link ]] || { echo "no program $target in $build/tests" >&2; exit 1; }
  variant=${target%_*}_${name}_${target##*_}
  line=$(sed "s#[^ ]*lib$lib\.a#$work/lib$lib.a#g; s# -o $target # -o $out/$variant #" "$link")
  (cd "$build/tests" && eval "$line")
  echo "$out/$variant"
done
