#!/usr/bin/env bash
# Build the random Nemotron-H MoE benchmark model (HF checkpoint + bf16/Q8_0 GGUF) and smoke-test it with llama-bench.
#
#   tools/bench/make_nemotron_moe.sh [args for make_nemotron_moe.py, e.g. --force --seed 1234 --check-f32]
#   SKIP_SMOKE=1 tools/bench/make_nemotron_moe.sh     # no llama-bench run
#
# Needs: scripts/setup-ref-env.sh (.venv-ref) and scripts/build-llama-cpp.sh (.cache/llama.cpp with llama-quantize,
# llama-bench and the static libs for .cache/ref/lcpp_logits). About 1.5 min and ~5 GB peak RAM on 2 cores;
# writes ~2.8 GB under models/bench/ (git-ignored). Details: the docstring of make_nemotron_moe.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
py=.venv-ref/bin/python
bin=.cache/llama.cpp/build/bin
[ -x "$py" ] || { echo "make_nemotron_moe: $py missing: run scripts/setup-ref-env.sh" >&2; exit 1; }
[ -x "$bin/llama-quantize" ] || { echo "make_nemotron_moe: $bin/llama-quantize missing: run scripts/build-llama-cpp.sh" >&2; exit 1; }

"$py" tools/bench/make_nemotron_moe.py "$@"

if [ "${SKIP_SMOKE:-0}" != 1 ]; then
  # Smoke test only (one repetition, tiny sizes): speed is measured elsewhere.
  for q in bf16 q8_0; do
    "$bin/llama-bench" -m "models/bench/nemotron-h-moe.$q.gguf" -t 2 -p 64 -n 16 -r 1
  done
fi
