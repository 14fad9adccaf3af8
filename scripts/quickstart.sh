#!/usr/bin/env bash
# Fetch the default model if absent, build elastica, and chat with it once.
# Usage: scripts/quickstart.sh ["your prompt"]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh
cargo build --release --quiet
prompt="${1:-In two sentences, what is a nested (many-in-one) language model?}"
exec ./target/release/elastica run models/SmolLM2-135M-Instruct.Q4_1.gguf --chat -p "$prompt" -n 200
