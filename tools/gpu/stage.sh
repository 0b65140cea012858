# Sourced by the scripts that run on the GPU machine (run_tests.sh, run_eval.sh), from the
# repository root, with $stage (kept across calls while the machine stays warm), $out and a
# note() function set: unpacks a carried .gpu/bundle into $stage/bundle and collects the carried
# SmolLM2 GGUF parts, joining them once both are there and checking the sha256 that
# tests/data/smollm2/goldens.json records. Sets $bundle and $model (which may not exist yet).
mkdir -p "$stage/model"
if [[ -f .gpu/bundle/bundle.tar.xz ]]; then
  rm -rf "$stage/bundle" && mkdir -p "$stage/bundle"
  tar -C "$stage/bundle" -xJf .gpu/bundle/bundle.tar.xz 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      .gpu/bundle/bundle.tar.xz "$stage/bundle"
fi
if [[ ! -d $stage/bundle/bin ]]; then
  echo "no bundle: carry .gpu/bundle (tools/gpu/bundle.sh) in this call or the previous one" >&2
  exit 1
fi
bundle=$stage/bundle
for part in .gpu/model_?/*; do
  [[ -f $part ]] && cp "$part" "$stage/model/"
done
model=$stage/model/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $model ]]; then
  parts=("$stage"/model/*.part_?)
  if ((${#parts[@]} >= 2)) && [[ -f ${parts[0]} ]]; then
    # The parts so far, in order; the sha256 says whether they are all of them.
    cat "${parts[@]}" >"$model.joining"
    want=$(python3 -c 'import json; print(json.load(open("tests/data/smollm2/goldens.json"))["model_sha256"])')
    got=$(sha256sum "$model.joining" | cut -d' ' -f1)
    if [[ $got == "$want" ]]; then
      mv "$model.joining" "$model"
      note "model: joined ${#parts[@]} parts, sha256 $got (matches goldens.json)"
    else
      rm -f "$model.joining"
      note "model: ${#parts[@]} parts here, not complete yet (or corrupt: sha256 $got)"
    fi
  fi
fi
