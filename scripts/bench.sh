#!/usr/bin/env bash
# Speed against llama.cpp on the same GGUF files, in the same run (2 threads by default).
# Usage: scripts/bench.sh [-t THREADS] [-r REPS]
# Builds elastica and llama.cpp (scripts/build-llama-cpp.sh), fetches SmolLM2, makes Q8_0 and BF16
# copies with llama-quantize, then for each file runs llama-bench and `elastica bench` (pp512,
# tg128, medians of REPS runs). Also: tg of a half-width budget against the full model, and the
# random Nemotron-H MoE model from tools/bench/make_nemotron_moe.sh if it has been made.
# Writes bench-out/results.md and bench-out/results.json.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
reps=5
while getopts "t:r:" o; do case $o in t) threads=$OPTARG ;; r) reps=$OPTARG ;; *) exit 2 ;; esac; done
cargo build --release --quiet
scripts/build-llama-cpp.sh
scripts/fetch-model.sh
bin=.cache/llama.cpp/build/bin
m=models/SmolLM2-135M-Instruct
for q in Q8_0 BF16; do
  [ -f "$m.$q.gguf" ] || "$bin/llama-quantize" --allow-requantize "$m.Q4_1.gguf" "$m.$q.gguf" "$q" 2 >/dev/null
done
mkdir -p bench-out
out=bench-out/raw.jsonl
: >"$out"
run() { # label file budget
  local label=$1 file=$2 budget=${3:-full}
  echo "== $label: $file [$budget]" >&2
  if [ "$budget" = full ]; then
    "$bin/llama-bench" -m "$file" -t "$threads" -p 512 -n 128 -r "$reps" -o json 2>/dev/null \
      | python3 -c 'import sys,json,statistics as s
for r in json.load(sys.stdin):
    print(json.dumps({"engine":"llama.cpp","label":sys.argv[1],"test":"pp" if r["n_gen"]==0 else "tg","median":s.median(r["samples_ts"])}))' "$label" >>"$out"
  fi
  ./target/release/elastica bench "$file" -t "$threads" -b "$budget" -p 512 -n 128 -r "$reps" --json \
    | python3 -c 'import sys,json
r=json.load(sys.stdin)
for t in ("pp","tg"):
    print(json.dumps({"engine":"elastica","label":sys.argv[1],"test":t,"median":r[t],"bytes_per_token":r["bytes_per_token"],"budget":r["budget"]}))' "$label" >>"$out"
}
run "SmolLM2 Q4_1" "$m.Q4_1.gguf"
run "SmolLM2 Q8_0" "$m.Q8_0.gguf"
run "SmolLM2 BF16" "$m.BF16.gguf"
run "SmolLM2 BF16 half-width" "$m.BF16.gguf" "hidden=288,ffn=768,heads=6"
run "SmolLM2 Q8_0 half-width" "$m.Q8_0.gguf" "hidden=288,ffn=768,heads=6"
for f in models/bench/nemotron-h-moe.q8_0.gguf models/bench/nemotron-h-moe.bf16.gguf; do
  [ -f "$f" ] && run "Nemotron-H MoE $(basename "$f" .gguf | sed 's/.*\.//')" "$f"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
res = {}
for r in rows:
    res.setdefault(r["label"], {}).setdefault(r["engine"], {})[r["test"]] = r
lines = ["| model | test | llama.cpp tok/s | elastica tok/s | ratio |", "|---|---|---:|---:|---:|"]
for label, e in res.items():
    for t in ("pp", "tg"):
        el = e.get("elastica", {}).get(t)
        lc = e.get("llama.cpp", {}).get(t)
        if not el:
            continue
        name = "pp512" if t == "pp" else "tg128"
        if lc:
            lines.append(f"| {label} | {name} | {lc['median']:.1f} | {el['median']:.1f} | {el['median']/lc['median']:.2f}x |")
        else:
            lines.append(f"| {label} | {name} | — | {el['median']:.1f} | — |")
for q in ("BF16", "Q8_0"):
    full = res.get(f"SmolLM2 {q}", {}).get("elastica", {}).get("tg")
    half = res.get(f"SmolLM2 {q} half-width", {}).get("elastica", {}).get("tg")
    if full and half:
        lines.append(f"\nhalf-width budget ({q}): tg {half['median']:.1f} vs {full['median']:.1f} tok/s = {half['median']/full['median']:.2f}x; "
                     f"weight bytes per token {half['bytes_per_token']/2**20:.1f} vs {full['bytes_per_token']/2**20:.1f} MiB = {full['bytes_per_token']/half['bytes_per_token']:.2f}x fewer")
text = "\n".join(lines)
print(text)
open("bench-out/results.md", "w").write(text + "\n")
json.dump(res, open("bench-out/results.json", "w"), indent=1)
PY
