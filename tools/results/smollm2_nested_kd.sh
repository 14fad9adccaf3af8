#!/usr/bin/env bash
# Nested KD on SmolLM2-135M: train the elastic checkpoint of tools/results/smollm2_zero_shot.sh
# (budgets full/0.75/0.5) with the router, then distil each smaller budget alone, twice: with as many
# tokens as the whole nested run, and with as many as the nested run spent on that budget. Score
# everything on held-out text with `elastica perplexity`.
# Usage: tools/results/smollm2_nested_kd.sh [WORK_DIR]   (default: .cache/nested-kd)
# Env: TOKENS (default 131072 per run), CHUNKS (default 40), LR (default 2e-4).
# Every run checkpoints every 16 steps; rerunning the script resumes where it stopped.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w="${1:-.cache/nested-kd}"
mkdir -p "$w"
z=.cache/zero-shot
[ -f "$z/width.gguf" ] || tools/results/smollm2_zero_shot.sh "$z"
cargo build --release --quiet
e=./target/release/elastica
tokens=${TOKENS:-131072}
chunks=${CHUNKS:-40}
lr=${LR:-2e-4}
common=(--data data/train.txt --eval-data data/eval.txt --seq 256 --batch 4 --seq2 512 --batch2 2
        --lr "$lr" --warmup 8 --eval-every 16 --eval-seqs 4 --ckpt-every 16 --no-progress -t 2)
run() { # name tokens extra-args...
  local name=$1 n=$2; shift 2
  if [ ! -f "$w/$name/summary.json" ]; then
    if [ -f "$w/$name/checkpoint/state.json" ]; then
      $e train "$z/width.gguf" "${common[@]}" --tokens "$n" --out "$w/$name" --resume "$@" > /dev/null
    else
      $e train "$z/width.gguf" "${common[@]}" --tokens "$n" --out "$w/$name" --force "$@" > /dev/null
    fi
  fi
  echo "$name trained" >&2
}
# Tokens the nested run trained budget $1 on (from its log).
spent() {
  python3 - "$w/nested/log.jsonl" "$1" <<'PY'
import json, sys
n, seen = 0, 0
for l in open(sys.argv[1]):
    d = json.loads(l)
    if "budget" in d:
        n += d["tokens"] - seen if d["budget"] == sys.argv[2] else 0
        seen = d["tokens"]
print(n)
PY
}
run nested "$tokens"
run single-0.75 "$tokens" --budgets 0.75
run single-0.5 "$tokens" --budgets 0.5
run parity-0.75 "$(spent 0.75)" --budgets 0.75
run parity-0.5 "$(spent 0.5)" --budgets 0.5
ppl() { $e perplexity "$1" -f data/eval.txt --ctx 512 --chunks "$chunks" --budget "$2" --json -t 2; }
: > "$w/ppl.jsonl"
row() { echo "{\"label\": \"$1\", \"model\": \"$2\", \"budget\": \"$3\", \"result\": $(ppl "$2" "$3")}" >> "$w/ppl.jsonl"; echo "$1 $3 scored" >&2; }
for b in full 0.75 0.5; do
  row "before (zero-shot elastic)" "$z/width.gguf" "$b"
  row "nested KD" "$w/nested/model.gguf" "$b"
done
for b in 0.75 0.5; do
  row "single-budget KD" "$w/single-$b/model.gguf" "$b"
  row "single-budget KD, nested's tokens" "$w/parity-$b/model.gguf" "$b"
done
echo done >&2
