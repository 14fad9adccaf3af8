#!/usr/bin/env bash
# The figures of docs/results/reasoning-model.md: held-out accuracy of the parent with and
# without thinking, then the budget-control grid of the shipped elastic model (every budget by
# thinking cap; every think/answer pairing by hand-off and cap), its tables and Pareto figure.
# Usage: tools/reasoning/results.sh [WORK]   (WORK: tools/reasoning/reproduce.sh's, default
# .cache/reasoning). One thread per run (the fastest for this model), two runs at once (the model
# stays in the caches), 600 held-out problems per setting; thinking caps 16/32/64/128 tokens for
# single budgets and 32/64 for pairings (the traces average about 115 tokens). Rerunning skips the
# settings already run.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
w=${1:-.cache/reasoning}
cargo build --release --quiet
test=tests/fixtures/reasoning/test.jsonl
py=tools/reasoning
# The parent (no manifest): thinking uncapped against thinking off.
python3 $py/budget_control.py "$w/parent/model" $test "$w/eval-parent" --budgets full --caps "" \
  --threads 1 --jobs 2
# The shipped model: the whole grid.
python3 $py/budget_control.py models/nemotron-h-elastic-tiny $test "$w/eval" --threads 1 --jobs 2 \
  --caps 16,32,64,128 --pair-caps 32,64
python3 $py/report.py "$w/eval/results.jsonl" --md "$w/eval/report.md" --points "$w/eval/points.json"
cargo run --release --quiet --example pareto -- "$w/eval/points.json" docs/results/reasoning-budget-control.png
python3 - "$w" <<'PY'
import json, sys
w = sys.argv[1]
for r in map(json.loads, open(f"{w}/eval-parent/results.jsonl")):
    print(f"parent {r['name']}: accuracy {r['accuracy']:.3f}, {r['seconds'] * 1000:.1f} ms/problem, by level",
          {k: v["accuracy"] for k, v in r["by_level"].items()})
PY
echo "tables: $w/eval/report.md; figure: docs/results/reasoning-budget-control.png" >&2
