#!/usr/bin/env bash
# Speed against llama.cpp on the same GGUF files, interleaved in one run, with the roofline.
# Usage: scripts/bench.sh [-t THREADS] [-r ROUNDS] [-q]     (-q: SmolLM2 Q8_0 and BF16 only)
# Builds elastica and llama.cpp (scripts/build-llama-cpp.sh), fetches SmolLM2 and makes its
# BF16, F16, Q8_0, Q4_0, Q4_K_M, Q5_K_M and Q6_K copies from the shipped Q4_1 with llama-quantize
# (requantized: speed does not depend on the values). The Nemotron-H MoE bench model
# (tools/bench/make_nemotron_moe.sh, BF16 and Q8_0) is made if the reference venv is there
# (scripts/setup-ref-env.sh), else skipped with a note. Each round runs, per file, llama-bench
# (-r 1) then `elastica bench` (-r 1) on pp512 and tg128; medians over the rounds. Then a
# STREAM-like read test (`cargo run --example read_bw`) with the same threads gives the roofline:
# decode's achieved bandwidth is weight bytes per token × tok/s. Also: a half-width budget run
# from the parent's copy (its matrices re-laid in column panels at load, `--panel-budget`, as
# the manifest's budgets are for an elastic model) against the full model and against the same
# budget sliced into its own file, and what those panels cost the full budget. The output names
# the CPU model and its SIMD flags.
# Writes bench-out/results.md and bench-out/results.json.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
threads=2
rounds=5
quick=0
while getopts "t:r:q" o; do
  case $o in t) threads=$OPTARG ;; r) rounds=$OPTARG ;; q) quick=1 ;; *) exit 2 ;; esac
done
cargo build --release --quiet --bin elastica --example read_bw
scripts/build-llama-cpp.sh
scripts/fetch-model.sh
bin=.cache/llama.cpp/build/bin
m=models/SmolLM2-135M-Instruct
formats="BF16 F16 Q8_0 Q4_0 Q4_1 Q4_K_M Q5_K_M Q6_K"
[ "$quick" = 1 ] && formats="BF16 Q8_0"
files=()
labels=()
budgets=()
extras=()
add() { labels+=("$1"); files+=("$2"); budgets+=("${3:-full}"); extras+=("${4:-}"); }
for q in $formats; do
  if [ ! -f "$m.$q.gguf" ]; then
    "$bin/llama-quantize" --allow-requantize "$m.Q4_1.gguf" "$m.$q.gguf.tmp" "$q" 2 >/dev/null
    mv "$m.$q.gguf.tmp" "$m.$q.gguf"
  fi
  add "SmolLM2 $q" "$m.$q.gguf"
done
half="hidden=288,ffn=768,heads=6"
for q in BF16 Q8_0; do
  add "SmolLM2 $q half-width" "$m.$q.gguf" "$half" "--panel-budget=$half"
  # The same budget sliced into its own file: what the view from the parent's copy must match.
  if [ ! -f "$m.$q.half.gguf" ]; then
    ./target/release/elastica slice "$m.$q.gguf" -b "$half" -o "$m.$q.half.gguf.tmp" --force >/dev/null
    mv "$m.$q.half.gguf.tmp" "$m.$q.half.gguf"
  fi
  add "SmolLM2 $q half-width sliced" "$m.$q.half.gguf"
  add "SmolLM2 $q full, half-width panels" "$m.$q.gguf" full "--panel-budget=$half"
done
moe=models/bench/nemotron-h-moe
if [ "$quick" = 0 ] && [ ! -f "$moe.q8_0.gguf" ]; then
  if [ -x .venv-ref/bin/python ]; then
    SKIP_SMOKE=1 tools/bench/make_nemotron_moe.sh >&2
  else
    echo "bench: no $moe.*.gguf and no .venv-ref (scripts/setup-ref-env.sh): the Nemotron-H MoE rows are skipped" >&2
  fi
fi
if [ "$quick" = 0 ]; then
  for q in bf16 q8_0; do
    [ -f "$moe.$q.gguf" ] && add "Nemotron-H MoE ${q^^}" "$moe.$q.gguf"
  done
fi
mkdir -p bench-out
out=bench-out/raw.jsonl
: >"$out"
for ((round = 1; round <= rounds; round++)); do
  for i in "${!files[@]}"; do
    label=${labels[$i]} file=${files[$i]} budget=${budgets[$i]} extra=${extras[$i]}
    echo "== round $round/$rounds: $label [$budget]" >&2
    if [ "$budget" = full ] && [ -z "$extra" ]; then
      "$bin/llama-bench" -m "$file" -t "$threads" -p 512 -n 128 -r 1 -o json 2>/dev/null \
        | python3 -c 'import sys,json
for r in json.load(sys.stdin):
    print(json.dumps({"engine":"llama.cpp","label":sys.argv[1],"test":"pp" if r["n_gen"]==0 else "tg","tok_s":r["avg_ts"]}))' "$label" >>"$out"
    fi
    # shellcheck disable=SC2086  # $extra: one flag or none
    ./target/release/elastica bench "$file" -t "$threads" -b "$budget" $extra -p 512 -n 128 -r 1 --json \
      | python3 -c 'import sys,json
r=json.load(sys.stdin)
for t in ("pp","tg"):
    print(json.dumps({"engine":"elastica","label":sys.argv[1],"test":t,"tok_s":r[t],"bytes_per_token":r["bytes_per_token"],"budget":r["budget"]}))' "$label" >>"$out"
  done
done
./target/release/examples/read_bw "$threads" 1024 >bench-out/read_bw.json
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
fam=$(grep -m1 '^cpu family' /proc/cpuinfo | sed 's/.*: //')
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512f|avx512bw|avx512vl|avx512_bf16|avx512_vnni|avx512vbmi|amx_bf16|amx_int8)$' | tr '\n' ' ')
python3 - "$out" bench-out/read_bw.json "$threads" "$cpu (family $fam)" "$flags" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bw = json.load(open(sys.argv[2]))
threads = sys.argv[3]
cpu, flags = sys.argv[4], sys.argv[5].strip()
res = {}
for r in rows:
    e = res.setdefault(r["label"], {}).setdefault(r["engine"], {}).setdefault(r["test"], {"samples": []})
    e["samples"].append(r["tok_s"])
    if "bytes_per_token" in r:
        e["bytes_per_token"] = r["bytes_per_token"]
for e in res.values():
    for t in e.values():
        for x in t.values():
            x["median"] = statistics.median(x["samples"])
peak = bw["gb_per_s"]
lines = [f"CPU: {cpu}; flags: {flags}", "",
         f"{threads} threads; read bandwidth (read_bw, best of 7): {peak:.1f} GB/s", "",
         "| model | test | llama.cpp tok/s | elastica tok/s | ratio | elastica GB/s read | of the read bandwidth |",
         "|---|---|---:|---:|---:|---:|---:|"]
for label, e in res.items():
    for t in ("pp", "tg"):
        el = e.get("elastica", {}).get(t)
        lc = e.get("llama.cpp", {}).get(t)
        if not el:
            continue
        name = "pp512" if t == "pp" else "tg128"
        ratio = f"{el['median'] / lc['median']:.2f}x" if lc else "—"
        lcs = f"{lc['median']:.1f}" if lc else "—"
        roof = ""
        if t == "tg":
            gbs = el["bytes_per_token"] * el["median"] / 1e9
            roof = f"{gbs:.1f} | {gbs / peak:.0%}"
        else:
            roof = " | "
        lines.append(f"| {label} | {name} | {lcs} | {el['median']:.1f} | {ratio} | {roof} |")
for q in ("BF16", "Q8_0"):
    full = res.get(f"SmolLM2 {q}", {}).get("elastica", {}).get("tg")
    half = res.get(f"SmolLM2 {q} half-width", {}).get("elastica", {}).get("tg")
    if full and half:
        bytes_ratio = full["bytes_per_token"] / half["bytes_per_token"]
        speed = half["median"] / full["median"]
        lines.append(f"\nhalf-width budget ({q}): tg {half['median']:.1f} vs {full['median']:.1f} tok/s = {speed:.2f}x; "
                     f"weight bytes per token {half['bytes_per_token']/2**20:.1f} vs {full['bytes_per_token']/2**20:.1f} MiB = "
                     f"{bytes_ratio:.2f}x fewer; speedup / bytes ratio = {speed / bytes_ratio:.2f}")
        sl = res.get(f"SmolLM2 {q} half-width sliced", {}).get("elastica", {})
        for t in ("pp", "tg"):
            hv = res[f"SmolLM2 {q} half-width"]["elastica"][t]["median"]
            if t in sl:
                lines.append(f"half-width budget ({q}) {t}: view {hv:.1f} vs sliced file {sl[t]['median']:.1f} tok/s = {hv / sl[t]['median']:.2f}x")
        fp = res.get(f"SmolLM2 {q} full, half-width panels", {}).get("elastica", {})
        for t in ("pp", "tg"):
            fr = res[f"SmolLM2 {q}"]["elastica"][t]["median"]
            if t in fp:
                lines.append(f"full budget ({q}) {t} in the half-width panels: {fp[t]['median']:.1f} vs {fr:.1f} tok/s in the row layout = {fp[t]['median'] / fr:.2f}x")
text = "\n".join(lines)
print(text)
open("bench-out/results.md", "w").write(text + "\n")
json.dump({"cpu": cpu, "flags": flags, "threads": int(threads), "read_bw": bw, "results": res}, open("bench-out/results.json", "w"), indent=1)
PY
