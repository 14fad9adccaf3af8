#!/usr/bin/env bash
# Decode on a busy machine: elastica and llama.cpp side by side on the same GGUF, idle and with
# competing busy-loop processes, interleaved in one run (medians of REPS rounds).
# Usage: scripts/bench-busy.sh [-t THREADS] [-c COMPETITORS] [-r ROUNDS] [-m GGUF] [-e ELASTICA_BINARY]
# Defaults: -t 2, -c 1, -r 3, SmolLM2-135M-Instruct Q8_0 (requantized from the Q4_1 original).
# Also runs -t (THREADS+1), more threads than cores, idle. Writes bench-out/busy.md and busy.json.
# The goal (Hardening issue): busy decode at least 0.45x the idle figure with one competitor.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
competitors=1
rounds=3
model=""
elastica=./target/release/elastica
while getopts "t:c:r:m:e:" o; do
  case $o in t) threads=$OPTARG ;; c) competitors=$OPTARG ;; r) rounds=$OPTARG ;; m) model=$OPTARG ;; e) elastica=$OPTARG ;; *) exit 2 ;; esac
done
cargo build --release --quiet
scripts/build-llama-cpp.sh
scripts/fetch-model.sh
bin=.cache/llama.cpp/build/bin
if [ -z "$model" ]; then
  m=models/SmolLM2-135M-Instruct
  model=$m.Q8_0.gguf
  [ -f "$model" ] || "$bin/llama-quantize" --allow-requantize "$m.Q4_1.gguf" "$model" Q8_0 2 >/dev/null
fi
mkdir -p bench-out
out=bench-out/busy.jsonl
: >"$out"
pids=()
start_competitors() {
  for _ in $(seq "$competitors"); do
    sh -c 'while :; do :; done' &
    pids+=($!)
  done
  sleep 1
}
stop_competitors() {
  [ ${#pids[@]} -gt 0 ] && kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  pids=()
}
trap stop_competitors EXIT
measure() { # condition threads
  local cond=$1 t=$2
  timeout 300 "$bin/llama-bench" -m "$model" -t "$t" -p 128 -n 128 -r 1 -o json 2>/dev/null |
    python3 -c 'import sys,json
for r in json.load(sys.stdin):
    print(json.dumps({"engine":"llama.cpp","cond":sys.argv[1],"threads":int(sys.argv[2]),"test":"pp" if r["n_gen"]==0 else "tg","tps":r["avg_ts"]}))' "$cond" "$t" >>"$out"  || true
  timeout 300 "$elastica" bench "$model" -t "$t" -p 128 -n 128 -r 1 --json 2>/dev/null |
    python3 -c 'import sys,json
r=json.load(sys.stdin)
for k in ("pp","tg"):
    print(json.dumps({"engine":"elastica","cond":sys.argv[1],"threads":int(sys.argv[2]),"test":k,"tps":r[k],"pool":r["threads"]}))' "$cond" "$t" >>"$out" || true
}
for i in $(seq "$rounds"); do
  echo "round $i/$rounds: idle -t $threads" >&2
  measure idle "$threads"
  echo "round $i/$rounds: $competitors busy-loop process(es), -t $threads" >&2
  start_competitors
  measure busy "$threads"
  stop_competitors
  echo "round $i/$rounds: idle -t $((threads + 1))" >&2
  measure idle "$((threads + 1))"
done
python3 - "$out" "$model" "$competitors" "$rounds" <<'PY'
import json, sys, statistics as st
rows = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for r in rows:
    med.setdefault((r["engine"], r["cond"], r["threads"], r["test"]), []).append(r["tps"])
med = {k: st.median(v) for k, v in med.items()}
conds = sorted({(r["cond"], r["threads"]) for r in rows}, key=lambda c: (c[1], c[0] != "idle"))
lines = [f"model {sys.argv[2]}; busy = {sys.argv[3]} competing busy-loop process(es); medians of {sys.argv[4]} rounds",
         "", "| condition | -t | test | llama.cpp tok/s | elastica tok/s | elastica / llama.cpp |", "|---|---|---|---:|---:|---:|"]
for c, t in conds:
    for test in ("pp", "tg"):
        l, e = med.get(("llama.cpp", c, t, test)), med.get(("elastica", c, t, test))
        if l and e:
            lines.append(f"| {c} | {t} | {test}128 | {l:.1f} | {e:.1f} | {e/l:.2f}x |")
lines.append("")
t = min(t for _, t in conds)
for eng in ("llama.cpp", "elastica"):
    i, b = med.get((eng, "idle", t, "tg")), med.get((eng, "busy", t, "tg"))
    if i and b:
        lines.append(f"{eng}: busy / idle decode at -t {t} = {b:.1f} / {i:.1f} = {b/i:.2f}x (goal for elastica: >= 0.45x)")
text = "\n".join(lines)
print(text)
open("bench-out/busy.md", "w").write(text + "\n")
json.dump({"|".join(map(str, k)): v for k, v in med.items()}, open("bench-out/busy.json", "w"), indent=1)
PY
