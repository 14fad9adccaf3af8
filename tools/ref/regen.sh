#!/usr/bin/env bash
# Regenerate every test fixture under tests/fixtures/ and re-check the GGUFs against llama.cpp.
# Usage: tools/ref/regen.sh            (from anywhere; ~1 min once the venv and llama.cpp exist)
# Needs: scripts/setup-ref-env.sh (run here), scripts/build-llama-cpp.sh (for the GGUF steps).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export OMP_NUM_THREADS=2
bash scripts/setup-ref-env.sh
py=.venv-ref/bin/python

# 1. HF checkpoints + reference logits (deterministic)
$py tools/ref/gen_fixtures.py

# 2. GGUF (f32) of the Nemotron-H fixtures with llama.cpp's own converter
lcpp=".cache/llama.cpp"
if [ ! -f "$lcpp/convert_hf_to_gguf.py" ]; then
  echo "regen: $lcpp missing: run scripts/build-llama-cpp.sh, then re-run for the GGUF steps" >&2
  exit 1
fi
for f in nemotron_h_dense nemotron_h_moe; do
  $py tools/ref/convert_gguf.py "tests/fixtures/$f" --outtype f32 --outfile "tests/fixtures/$f/model-f32.gguf"
done

# 3. llama.cpp logits vs reference.json (needs the static libs of the llama.cpp build)
$py tools/ref/check_gguf.py tests/fixtures/nemotron_h_dense tests/fixtures/nemotron_h_moe
