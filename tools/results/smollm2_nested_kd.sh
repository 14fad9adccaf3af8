#!/usr/bin/env bash
# Nested KD on SmolLM2-135M: train the elastic checkpoint of tools/results/smollm2_zero_shot.sh
# (budgets full/0.75/0.5) with the router, then distil each smaller budget alone with the same
# number of tokens, and score everything on held-out text with `elastica perplexity`.
# Usage: tools/results/smollm2_nested_kd.sh [WORK_DIR]   (default: .cache/nested-kd)
# Env: TOKENS (default 65536 per run), CHUNKS (default 40), LR (default 2e-4).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w="${1:-.cache/nested-kd}"
mkdir -p "$w"
z=.cache/zero-shot
[ -f "$z/width.gguf" ] || tools/results/smollm2_zero_shot.sh "$z"
cargo build --release --quiet
e=./target/release/elastica
tokens=${TOKENS:-65536}
chunks=${CHUNKS:-40}
lr=${LR:-2e-4}
common=(--data data/train.txt --eval-data data/eval.txt --tokens "$tokens" --seq 256 --batch 4 --seq2 512 --batch2 2
        --lr "$lr" --warmup 8 --eval-every 16 --eval-seqs 4 --ckpt-every 16 --no-progress -t 2)
run() { # name extra-args...
  local name=$1; shift
  if [ ! -f "$w/$name/summary.json" ]; then
    if [ -f "$w/$name/checkpoint/state.json" ]; then
      $e train "$z/width.gguf" "${common[@]}" --out "$w/$name" --resume "$@" > /dev/null
    else
      $e train "$z/width.gguf" "${common[@]}" --out "$w/$name" --force "$@" > /dev/null
    fi
  fi
  echo "$name trained" >&2
}
run nested
run single-0.75 --budgets 0.75
run single-0.5 --budgets 0.5
ppl() { $e perplexity "$1" -f data/eval.txt --ctx 512 --chunks "$chunks" --budget "$2" --json -t 2; }
: > "$w/ppl.jsonl"
row() { echo "{\"label\": \"$1\", \"model\": \"$2\", \"budget\": \"$3\", \"result\": $(ppl "$2" "$3")}" >> "$w/ppl.jsonl"; echo "$1 $3 scored" >&2; }
for b in full 0.75 0.5; do
  row "before (zero-shot elastic)" "$z/width.gguf" "$b"
  row "nested KD" "$w/nested/model.gguf" "$b"
done
row "single-budget KD" "$w/single-0.75/model.gguf" 0.75
row "single-budget KD" "$w/single-0.5/model.gguf" 0.5
echo done >&2
