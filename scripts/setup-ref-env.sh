#!/usr/bin/env bash
# Create the Python reference environment used by tools/ref/ (fixture generation, GGUF conversion).
# Usage: scripts/setup-ref-env.sh [VENV_DIR]   (default: .venv-ref in the repo root)
# Idempotent: re-running with everything installed only re-checks the pins.
# Only needed to REGENERATE test fixtures; the Rust test suite never runs Python.
# Note: PyPI's Linux torch wheel pulls the CUDA wheels (~5.6 GB in total); only the CPU is used.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-ref}"
py="${PYTHON:-python3}"

pins=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "tokenizers==0.23.3"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "gguf==0.19.0"
  "sentencepiece==0.2.3"
)

if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
# Fast path: everything already at the pinned versions.
if "$venv/bin/python" - "${pins[@]}" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    have = version(name)
    if have.split("+")[0] != want:
        sys.exit(1)
EOF
  echo "setup-ref-env: $venv up to date"
  exit 0
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${pins[@]}"
"$venv/bin/python" -c 'import torch, transformers, safetensors, numpy, gguf; print("setup-ref-env: torch", torch.__version__, "transformers", transformers.__version__, "gguf ok")'
