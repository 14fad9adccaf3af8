#!/usr/bin/env bash
# The tiny elastic Nemotron-H reasoning model (models/nemotron-h-elastic-tiny), from nothing, all
# through elastica's CLI: problems and tokenizer → `init` (random weights from
# tools/reasoning/config.json) → `train --objective lm` (the parent, from scratch) → `rank` →
# `elastify` (budgets full, 0.75 and 0.5 of the active parameters) → `train` (nested KD with the
# router, every budget at once, from the parent) → BF16 checkpoint.
# Usage: tools/reasoning/reproduce.sh [WORK] [--install]
#   WORK:      default .cache/reasoning (every step's output; rerunning resumes or skips what is done)
#   --install: copy the result over models/nemotron-h-elastic-tiny
# Env: LM_TOKENS (parent, default 10000000), KD_TOKENS (nested, default 1500000), THREADS (default 2).
# About 1 h 50 min (parent, ~1850 tok/s) + 25 min (nested) on 2 cores of an AMD EPYC Zen 5; every
# run checkpoints, so it may span several sittings.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w=.cache/reasoning
install=0
for a in "$@"; do
  case "$a" in
    --install) install=1 ;;
    *) w=$a ;;
  esac
done
lm_tokens=${LM_TOKENS:-10000000}
kd_tokens=${KD_TOKENS:-1500000}
t=${THREADS:-2}
cargo build --release --quiet
e=./target/release/elastica
mkdir -p "$w"
[ -f "$w/data/train.txt" ] || python3 tools/reasoning/problems.py --out "$w/data" --seed 0 >&2
[ -f "$w/tok/tokenizer.json" ] || python3 tools/reasoning/tokenizer.py --out "$w/tok" >&2
[ -d "$w/init" ] || $e init --config tools/reasoning/config.json --tokenizer "$w/tok" -o "$w/init" --seed 0 >&2

# A run that has a checkpoint resumes; one that finished is skipped.
train() {
  local out=$1; shift
  if [ -f "$out/summary.json" ]; then return; fi
  if [ -f "$out/checkpoint/state.json" ]; then
    $e train "$@" --out "$out" --resume -t "$t" --no-progress > /dev/null
  else
    $e train "$@" --out "$out" --force -t "$t" --no-progress > /dev/null
  fi
}
# The parent: next-token training from scratch on every training document (the last 5% of the
# tokens held out for perplexity); 512-token windows hold the longest documents (347 tokens).
train "$w/parent" "$w/init" --objective lm --data "$w/data/train.txt" --tokens "$lm_tokens" \
  --seq 512 --batch 4 --stage1 1 --lr 1.5e-3 --warmup 200 --weight-decay 0.1 \
  --eval-every 250 --eval-seqs 16 --ckpt-every 100
# Importance on the first 300 kB of the training text, then the nested checkpoint.
head -c 300000 "$w/data/train.txt" > "$w/calib.txt"
[ -f "$w/importance.json" ] || $e rank "$w/parent/model" --calib "$w/calib.txt" --samples 64 \
  --seq 256 -o "$w/importance.json" -t "$t" >&2
[ -d "$w/elastic" ] || $e elastify "$w/parent/model" --importance "$w/importance.json" \
  --budgets full=1.0,0.75=active:0.75,0.5=active:0.5 -o "$w/elastic" -t "$t" >&2
# Nested KD from the frozen parent, the router choosing each budget's sizes.
train "$w/nested" "$w/elastic" --data "$w/data/train.txt" --tokens "$kd_tokens" \
  --seq 512 --batch 4 --seq2 512 --batch2 4 --lr 5e-4 --warmup 50 \
  --eval-every 100 --eval-seqs 16 --ckpt-every 50 --dtype bf16
$e info "$w/nested/model"
if [ "$install" = 1 ]; then
  dst=models/nemotron-h-elastic-tiny
  rm -rf "$dst.new" && cp -r "$w/nested/model" "$dst.new"
  rm -rf "$dst" && mv "$dst.new" "$dst"
  echo "installed $dst" >&2
fi
