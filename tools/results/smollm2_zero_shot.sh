#!/usr/bin/env bash
# Zero-shot elastic SmolLM2-135M: rank on calibration text, elastify, and measure held-out
# perplexity of importance-ordered, natural-order and random-order budgets, and width-only vs
# depth-only budgets at equal parameters. Then slice a GGUF budget and check it in llama.cpp.
# Usage: tools/results/smollm2_zero_shot.sh [WORK_DIR]   (default: .cache/zero-shot)
# Writes WORK_DIR/results.json and WORK_DIR/importance.png; takes ~30 minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w="${1:-.cache/zero-shot}"
mkdir -p "$w"
scripts/fetch-model.sh
scripts/fetch-text.sh
cargo build --release --quiet
e=./target/release/elastica
m=models/SmolLM2-135M-Instruct.Q4_1.gguf
chunks=${CHUNKS:-40}
t=2
[ -f "$w/importance.json" ] || $e rank "$m" --calib data/calib.txt --samples 64 --seq 256 --depth iterative --depth-samples 2 --depth-seq 128 \
  --out "$w/importance.json" --plot "$w/importance.png" -t $t
# Importance order, width axes (the default) and depth only, at 75% and 50% of parameters.
[ -f "$w/width.gguf" ] || $e elastify "$m" --importance "$w/importance.json" --budgets full,0.75,0.5 --calib data/calib.txt --dtype f32 --out "$w/width.gguf" --json -t $t > "$w/width.json"
[ -f "$w/depth.gguf" ] || $e elastify "$m" --importance "$w/importance.json" --budgets full,0.75,0.5 --axes depth --calib data/calib.txt --dtype f32 --out "$w/depth.gguf" --json -t $t > "$w/depth.json"
# The same width budgets on the natural order and a random order (both written as F32, like the
# importance-ordered file, so all three share numerics).
[ -f "$w/natural.gguf" ] || $e elastify "$m" --importance "$w/importance.json" --budgets full --order natural --dtype f32 --out "$w/natural.gguf" --json -t $t > "$w/natural.json"
[ -f "$w/random.gguf" ] || $e elastify "$m" --importance "$w/importance.json" --budgets full --order random --seed 1 --dtype f32 --out "$w/random.gguf" --json -t $t > "$w/random.json"
spec() { python3 -c "import json,sys; print([b['spec'] for b in json.load(open(sys.argv[1]))['budgets'] if b['name']==sys.argv[2]][0])" "$1" "$2"; }
ppl() { $e perplexity "$1" -f data/eval.txt --ctx 512 --chunks "$chunks" --budget "$2" --json -t $t; }
: > "$w/ppl.jsonl"
row() { # label model budget
  echo "{\"label\": \"$1\", \"model\": \"$2\", \"result\": $(ppl "$2" "$3")}" >> "$w/ppl.jsonl"
  echo "$1 done" >&2
}
row "parent (Q4_1 file)" "$m" full
row "parent (F32 elastic file)" "$w/width.gguf" full
for f in 0.75 0.5; do
  s=$(spec "$w/width.json" "$f")
  row "importance width $f" "$w/width.gguf" "$s"
  row "natural width $f" "$w/natural.gguf" "$s"
  row "random width $f" "$w/random.gguf" "$s"
  row "importance depth $f" "$w/depth.gguf" "$(spec "$w/depth.json" "$f")"
done
# Slicing: throughput against cp of the same bytes, peak memory, and llama.cpp on the slice.
/usr/bin/time -f "%e s, %M KB peak RSS" -o "$w/slice.time" $e slice "$w/width.gguf" --budget 0.75 --out "$w/slice-0.75.gguf" --force --json > "$w/slice.json"
/usr/bin/time -f "%e s, %M KB peak RSS" -o "$w/cp.time" cp "$w/slice-0.75.gguf" "$w/copy.gguf"
rm -f "$w/copy.gguf"
$e perplexity "$w/slice-0.75.gguf" -f data/eval.txt --ctx 512 --chunks "$chunks" --json -t $t > "$w/slice-ppl.json"
if [ -x .cache/llama.cpp/build/bin/llama-perplexity ]; then
  .cache/llama.cpp/build/bin/llama-perplexity -m "$w/slice-0.75.gguf" -f data/eval.txt -c 512 --chunks "$chunks" -t $t 2>&1 | grep "Final estimate" > "$w/slice-llama.txt" || true
fi
python3 - "$w" <<'PY'
import json, sys
w = sys.argv[1]
rows = [json.loads(l) for l in open(f"{w}/ppl.jsonl")]
out = {"rows": rows, "slice": json.load(open(f"{w}/slice.json")), "slice_time": open(f"{w}/slice.time").read().strip(),
       "cp_time": open(f"{w}/cp.time").read().strip(), "slice_ppl_elastica": json.load(open(f"{w}/slice-ppl.json"))}
try:
    out["slice_ppl_llama_cpp"] = open(f"{w}/slice-llama.txt").read().strip()
except FileNotFoundError:
    pass
json.dump(out, open(f"{w}/results.json", "w"), indent=1)
for r in rows:
    print(f"{r['label']:<24} ppl {r['result']['ppl']:8.3f}  params {r['result']['params_total']/1e6:7.2f}M  budget {r['result']['budget']}")
print(out["slice_time"], "| cp:", out["cp_time"], "|", out["slice"])
print("slice ppl elastica", out["slice_ppl_elastica"]["ppl"], "| llama.cpp", out.get("slice_ppl_llama_cpp"))
PY
