#!/usr/bin/env bash
# Nested self-speculative decoding against plain greedy decoding (issue 11, point 8): drafts at the
# model's smaller manifest budgets, K = 1..8, `elastica bench --speculate` on a text prompt.
# Usage: tools/results/speculative.sh MODEL [DRAFTS] [OUT_DIR]
#   MODEL: an elastic checkpoint (default: the nested-KD SmolLM2, .cache/nested-kd/nested/model.gguf)
#   DRAFTS: space-separated draft budgets (default "0.75 0.5"); OUT_DIR default bench-out.
# Env: KS, the draft lengths (default "1 2 3 4 5 6 7 8").
# Writes OUT_DIR/speculative.jsonl and OUT_DIR/speculative.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
model=${1:-.cache/nested-kd/nested/model.gguf}
drafts=${2:-0.75 0.5}
out=${3:-bench-out}
mkdir -p "$out"
cargo build --release --quiet
e=./target/release/elastica
prompt=$(mktemp)
trap 'rm -f "$prompt"' EXIT
# The first 1 200 characters of the held-out text as the prompt.
head -c 1200 data/eval.txt > "$prompt"
: > "$out/speculative.jsonl"
for d in $drafts; do
  for k in ${KS:-1 2 3 4 5 6 7 8}; do
    $e bench "$model" -p 0 -n 128 -r 3 --speculate "$d" --draft "$k" -f "$prompt" --json -t 2 \
      | python3 -c 'import json,sys; v=json.load(sys.stdin); print(json.dumps({"draft": sys.argv[1], "k": int(sys.argv[2]), **v["speculative"]}))' "$d" "$k" \
      >> "$out/speculative.jsonl"
    echo "draft $d K=$k done" >&2
  done
done
python3 - "$out/speculative.jsonl" > "$out/speculative.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| draft | K | tokens/round | acceptance by position | plain tok/s | speculative tok/s | speedup | draft s | verify s | identical |")
print("|---|---:|---:|---|---:|---:|---:|---:|---:|---|")
for r in rows:
    acc = " ".join(f"{a:.2f}" for a in r["acceptance_at"])
    print(f"| {r['draft']} (`{r['draft_budget']}`) | {r['k']} | {r['tokens_per_round']:.2f} | {acc} | "
          f"{r['plain_tok_s']:.1f} | {r['speculative_tok_s']:.1f} | {r['speedup']:.2f}x | "
          f"{r['draft_seconds']:.2f} | {r['verify_seconds']:.2f} | {r['identical']} |")
PY
cat "$out/speculative.md"
