#!/usr/bin/env bash
# Independent check of elastica's ModelOpt checkpoints with llama.cpp: the vendored tree's own
# converter (convert_hf_to_gguf.py, which reads ModelOpt NVFP4 and FP8) turns our NVFP4 and FP8 HF
# checkpoints and a slice of each into GGUF; llama-perplexity and `elastica perplexity` then score
# the same files, and elastica also scores its own HF originals.
# Usage: tools/results/quantize_llamacpp.sh [WORK_DIR]   (default .cache/quantize; run
#        tools/results/quantize.sh first). Env: CHUNKS (default 40), SLICE (default below).
# The NVFP4 slice cuts at 64-value multiples: llama.cpp's NVFP4 is made of 64-value super-blocks
# (the nested model's 0.5 budget cuts hidden at 480 and FFN at 496, multiples of 16 only), and
# transformers (which the converter loads the config with) wants hidden divisible by the heads.
# Writes WORK_DIR/llamacpp.jsonl.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w="${1:-.cache/quantize}"
chunks=${CHUNKS:-40}
slice=${SLICE:-ffn=1024,heads=6}
[ -d "$w/nvfp4" ] && [ -d "$w/fp8" ] || { echo "error: run tools/results/quantize.sh first" >&2; exit 1; }
scripts/setup-ref-env.sh "$root/.venv-ref" >&2
scripts/build-llama-cpp.sh >&2
cargo build --release --quiet
e=./target/release/elastica
py=.venv-ref/bin/python
lcpp=.cache/llama.cpp
out="$w/llamacpp.jsonl"
: > "$out"
for q in nvfp4 fp8; do
  [ -d "$w/$q-slice" ] || $e slice "$w/$q" -b "$slice" -o "$w/$q-slice" >&2
  for m in "$w/$q" "$w/$q-slice"; do
    g="$m.lcpp.gguf"
    [ -f "$g" ] || "$py" "$lcpp/convert_hf_to_gguf.py" "$m" --outfile "$g" --outtype bf16 >&2
    lp=$("$lcpp/build/bin/llama-perplexity" -m "$g" -f data/eval.txt -c 512 --chunks "$chunks" -t 2 2>&1 \
         | sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
    ep=$($e perplexity "$g" -f data/eval.txt --ctx 512 --chunks "$chunks" --json -t 2)
    eh=$($e perplexity "$m" -f data/eval.txt --ctx 512 --chunks "$chunks" --json -t 2)
    echo "{\"format\": \"$q\", \"model\": \"$m\", \"gguf\": \"$g\", \"llama_cpp_ppl\": ${lp:-null}, \"elastica_gguf\": $ep, \"elastica_hf\": $eh}" >> "$out"
    echo "$m: llama.cpp ${lp:-failed}" >&2
  done
done
cat "$out"
