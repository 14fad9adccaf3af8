#!/usr/bin/env bash
# Aggregate throughput of N parallel sequences against llama.cpp's llama-batched-bench on the
# same GGUF, interleaved (llama.cpp then elastica at each N), pp 128 + tg 128 per sequence.
# Usage: scripts/batched-bench.sh [-t THREADS] [-n "1 4 16 64"] [-m MODEL.gguf] [-r REPS]
# REPS (default 3) interleaved rounds over all widths; the table gives each engine's medians.
# Builds elastica and llama.cpp (scripts/build-llama-cpp.sh) and fetches SmolLM2 when missing.
# Writes bench-out/batched.md and bench-out/batched.jsonl.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
reps=3
widths="1 4 16 64"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
while getopts "t:n:m:r:" o; do case $o in t) threads=$OPTARG ;; n) widths=$OPTARG ;; m) model=$OPTARG ;; r) reps=$OPTARG ;; *) exit 2 ;; esac; done
cargo build --release --quiet
bin=.cache/llama.cpp/build/bin
[ -x "$bin/llama-batched-bench" ] || scripts/build-llama-cpp.sh
[ -f "$model" ] || scripts/fetch-model.sh
mkdir -p bench-out
out=bench-out/batched.jsonl
: >"$out"
for rep in $(seq "$reps"); do
for n in $widths; do
  echo "== round $rep, N=$n" >&2
  # -c: room for 64 sequences of 128 + 128 (+ slack), as in the issue's command.
  "$bin/llama-batched-bench" -m "$model" -c 16896 -b 2048 -ub 512 -npp 128 -ntg 128 -npl "$n" \
    -t "$threads" --output-format jsonl 2>/dev/null \
    | python3 -c 'import sys,json
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{") and "speed_tg" in l:
        r=json.loads(l)
        print(json.dumps({"engine":"llama.cpp","n":r["pl"],"t_pp":r["t_pp"],"s_pp":r["speed_pp"],"t_tg":r["t_tg"],"s_tg":r["speed_tg"],"s":r["speed"]}))' >>"$out"
  ./target/release/elastica batched-bench "$model" -t "$threads" --npp 128 --ntg 128 --npl "$n" --json \
    | python3 -c 'import sys,json
for r in json.load(sys.stdin)["rows"]:
    print(json.dumps({"engine":"elastica","n":r["n"],"t_pp":r["t_pp"],"s_pp":r["s_pp"],"t_tg":r["t_tg"],"s_tg":r["s_tg"],"s":r["s"]}))' >>"$out"
done
done
python3 - "$out" "$threads" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
runs = {}
for r in rows:
    runs.setdefault(r["n"], {}).setdefault(r["engine"], []).append(r)
def median(rs, k):
    v = sorted(x[k] for x in rs)
    return v[len(v) // 2]
by = {n: {e: {k: median(rs, k) for k in ("s_pp", "s_tg", "s")} for e, rs in es.items()} for n, es in runs.items()}
reps = max(len(rs) for es in runs.values() for rs in es.values())
lines = [f"pp 128 + tg 128 per sequence, {sys.argv[2]} threads; S = tokens/s summed over the N sequences; medians of {reps} interleaved rounds.", "",
         "| N | llama.cpp S_PP | elastica S_PP | ratio | llama.cpp S_TG | elastica S_TG | ratio | llama.cpp S | elastica S | ratio |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
for n in sorted(by):
    l, e = by[n].get("llama.cpp"), by[n].get("elastica")
    if not (l and e):
        continue
    cells = []
    for k in ("s_pp", "s_tg", "s"):
        cells += [f"{l[k]:.1f}", f"{e[k]:.1f}", f"{e[k]/l[k]:.2f}x"]
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
text = "\n".join(lines)
print(text)
open("bench-out/batched.md", "w").write(text + "\n")
PY
