#!/usr/bin/env bash
# Any budget (issue 11, point 7): perplexity of in-between targets (0.9, 0.85, 0.65, 0.6) resolved between the
# manifest budgets of an elastic SmolLM2-135M, against those neighbours (full, 0.75, 0.5).
# Usage: tools/results/any_budget.sh [WORK_DIR] [IMPORTANCE]   (default: .cache/any-budget and
# the zero-shot script's .cache/zero-shot/importance.json). ~20 minutes on 2 cores.
# MODEL=CHECKPOINT uses that elastic checkpoint (e.g. the nested-KD one of
# tools/results/smollm2_nested_kd.sh) instead of elastifying SmolLM2 with IMPORTANCE.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w="${1:-.cache/any-budget}"
imp="${2:-.cache/zero-shot/importance.json}"
mkdir -p "$w"
cargo build --release --quiet
e=./target/release/elastica
m=models/SmolLM2-135M-Instruct.Q4_1.gguf
chunks=${CHUNKS:-40}
ck="${MODEL:-$w/elastic.gguf}"
[ -f "$ck" ] || $e elastify "$m" --importance "$imp" --budgets full,0.75,0.5 --dtype f32 --out "$ck"
$e info "$ck" -b 0.9 -b 0.85 -b 0.65 -b 0.6 --json > "$w/info.json"
: > "$w/ppl.jsonl"
for b in 0.9 0.85 0.65 0.6 full 0.75 0.5; do
  $e perplexity "$ck" --budget "$b" -f data/eval.txt --chunks "$chunks" --json >> "$w/ppl.jsonl"
done
cat "$w/ppl.jsonl"
