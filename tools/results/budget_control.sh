#!/usr/bin/env bash
# Budget control (issue 11, points 4, 5 and 8): a handful of chat prompts, thinking forced by a cap
# (--thinking-tokens 64) at a sub-budget S and answered at the full budget, with the `shared` and
# `reprefill` hand-offs: how often both give the same answer tokens, and what each costs.
# Usage: tools/results/budget_control.sh [MODEL] [S]   (default: the nested-KD SmolLM2 of
# .cache/nested-kd/nested/model.gguf with S = 0.5 when it exists, else SmolLM2 Q4_1 with
# S = hidden=288,ffn=768,heads=6). N answer+thinking tokens: N=${N:-160}. A few minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
kd=.cache/nested-kd/nested/model.gguf
if [ -n "${1:-}" ]; then m=$1; s=${2:-0.5}
elif [ -f "$kd" ]; then m=$kd; s=${2:-0.5}
else m=models/SmolLM2-135M-Instruct.Q4_1.gguf; s=${2:-hidden=288,ffn=768,heads=6}; fi
n=${N:-160}
cargo build --release --quiet
e=./target/release/elastica
out=$(mktemp -d)
prompts=(
  "What is the capital of France?"
  "Explain why the sky is blue in two sentences."
  "Write a haiku about autumn."
  "What is 17 times 3?"
  "Give three tips for learning a new language."
  "Who wrote Romeo and Juliet?"
  "Describe a cat to someone who has never seen one."
  "What causes the seasons on Earth?"
)
i=0
for p in "${prompts[@]}"; do
  for h in shared reprefill; do
    $e run "$m" --chat -p "$p" -n "$n" --ignore-eos --json --think-budget "$s" --answer-budget full \
      --thinking-tokens 64 --think-end "</think>" --handoff "$h" > "$out/$i.$h.json"
  done
  i=$((i + 1))
done
echo "model: $m, S = $s, L = full, thinking cap 64, $n tokens in all, ${#prompts[@]} prompts"
python3 - "$out" "${#prompts[@]}" <<'PY'
import json, sys
d, k = sys.argv[1], int(sys.argv[2])
same = 0; prefix = []; cost = {"shared": [0, 0, 0, 0], "reprefill": [0, 0, 0, 0]}
for i in range(k):
    r = {h: json.load(open(f"{d}/{i}.{h}.json")) for h in ("shared", "reprefill")}
    ans = {}
    for h, v in r.items():
        t, a = v["phases"][0], v["phases"][1]
        ans[h] = v["tokens"][t["tokens"]:]
        c = cost[h]; c[0] += t["seconds"]; c[1] += a["start_seconds"]; c[2] += a["seconds"]; c[3] += a["tokens"]
    assert r["shared"]["tokens"][:t["tokens"]] == r["reprefill"]["tokens"][:t["tokens"]]
    a, b = ans["shared"], ans["reprefill"]
    same += a == b
    prefix.append(next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
print(f"same answer tokens: {same}/{k} prompts; common prefix of the answers: mean {sum(prefix)/k:.1f} tokens, per prompt {prefix}")
print("| hand-off | thinking s | hand-off s | answer s (incl. hand-off) | answer tokens | answer tok/s |")
print("|---|---|---|---|---|---|")
for h, (ts, hs, as_, at) in cost.items():
    print(f"| {h} | {ts/k:.3f} | {hs/k:.3f} | {as_/k:.3f} | {at/k:.0f} | {at/as_:.1f} |")
print("(seconds are means per prompt)")
PY
rm -r "$out"
