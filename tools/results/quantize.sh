#!/usr/bin/env bash
# FP8 and NVFP4 of the nested-KD SmolLM2 elastic model (docs/results/smollm2-nested-kd.md): for
# every budget, held-out perplexity of BF16, FP8 PTQ, NVFP4 PTQ and NVFP4 QAD (with the tokens it
# spent), file sizes, and decode tok/s, all from one checkpoint per format.
# Usage: tools/results/quantize.sh [NESTED_MODEL] [WORK_DIR]
#   NESTED_MODEL: default .cache/nested-kd/nested/model.gguf (tools/results/smollm2_nested_kd.sh)
#   WORK_DIR:     default .cache/quantize
# Env: QAD_TOKENS (default 32768), QAD_LR (default 1e-4), CHUNKS (default 40), REPS (default 5).
# Writes WORK_DIR/ppl.jsonl and bench.jsonl; tools/results/quantize_report.py turns them into the
# results page (WORK_DIR/report.md).
# The QAD run checkpoints every 8 steps; rerunning the script resumes it.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
nested="${1:-.cache/nested-kd/nested/model.gguf}"
w="${2:-.cache/quantize}"
[ -e "$nested" ] || { echo "error: $nested is missing; run tools/results/smollm2_nested_kd.sh first" >&2; exit 1; }
scripts/fetch-text.sh
cargo build --release --quiet
e=./target/release/elastica
tokens=${QAD_TOKENS:-32768}
lr=${QAD_LR:-1e-4}
chunks=${CHUNKS:-40}
reps=${REPS:-5}
mkdir -p "$w"
# One BF16 HF copy of the elastic checkpoint (a full-budget slice keeps the manifest), then PTQ.
[ -d "$w/bf16" ] || $e slice "$nested" -b full --format hf --dtype bf16 -o "$w/bf16" >&2
[ -d "$w/fp8" ] || $e quantize "$w/bf16" --to fp8 --calib data/calib.txt --json -o "$w/fp8" > "$w/fp8.json"
[ -d "$w/nvfp4" ] || $e quantize "$w/bf16" --to nvfp4 --calib data/calib.txt --json -o "$w/nvfp4" > "$w/nvfp4.json"
# QAD: all budgets at once, fake NVFP4, against the BF16 elastic model as teacher.
qad=(--data data/train.txt --eval-data data/eval.txt --seq 256 --batch 4 --seq2 512 --batch2 2
     --lr "$lr" --warmup 4 --eval-every 16 --eval-seqs 4 --ckpt-every 8 --no-progress -t 2
     --tokens "$tokens" --quant nvfp4 --dtype bf16 --out "$w/qad")
if [ ! -f "$w/qad/summary.json" ]; then
  if [ -f "$w/qad/checkpoint/state.json" ]; then
    $e train "$w/bf16" "${qad[@]}" --resume > /dev/null
  else
    $e train "$w/bf16" "${qad[@]}" --force > /dev/null
  fi
fi
models=("bf16:$w/bf16" "fp8:$w/fp8" "nvfp4-ptq:$w/nvfp4" "nvfp4-qad:$w/qad/model")
# Perplexity once (kept across reruns); decode speed on every run (rerun it on a quiet machine).
if [ ! -s "$w/ppl.jsonl" ]; then
  : > "$w/ppl.tmp"
  for mb in "${models[@]}"; do
    label=${mb%%:*}; m=${mb#*:}
    size=$(stat -c %s "$m/model.safetensors")
    for b in full 0.75 0.5; do
      p=$($e perplexity "$m" -f data/eval.txt --ctx 512 --chunks "$chunks" --budget "$b" --json -t 2)
      echo "{\"label\": \"$label\", \"budget\": \"$b\", \"bytes\": $size, \"ppl\": $p}" >> "$w/ppl.tmp"
      echo "$label $b scored" >&2
    done
  done
  mv "$w/ppl.tmp" "$w/ppl.jsonl"
fi
# Decode speed: every format and budget, interleaved rounds (this machine's times wander).
: > "$w/bench.jsonl"
for r in $(seq 1 "$reps"); do
  for mb in "${models[@]}"; do
    label=${mb%%:*}; m=${mb#*:}
    for b in full 0.75 0.5; do
      t=$($e bench "$m" --budget "$b" -p 16 -n 128 -r 3 --json -t 2)
      echo "{\"label\": \"$label\", \"budget\": \"$b\", \"round\": $r, \"bench\": $t}" >> "$w/bench.jsonl"
    done
  done
  echo "bench round $r done" >&2
done
python3 tools/results/quantize_report.py "$w" > "$w/report.md"
echo "$w/report.md" >&2
