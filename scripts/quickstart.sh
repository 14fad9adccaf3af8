#!/usr/bin/env bash
# The main job on the default model, with no download: build elastica, then solve a problem with
# the tiny elastic Nemotron-H reasoning model shipped in models/ (one checkpoint; budgets full,
# 0.75 and 0.5 nested in it): first at the full budget alone, then thinking at 0.5 and answering
# at full (elastic budget control). Each run prints its budget per phase, tokens and time.
# Usage: scripts/quickstart.sh ["PROBLEM"]   (default: a 3-digit by 2-digit multiplication;
# the model knows sums/differences, products, (a*b+c*d)%m and "sort ...", as in
# tests/fixtures/reasoning/test.jsonl)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
cargo build --release --quiet
bin=./target/release/elastica
problem="${1:-347*86=?}"
"$bin" info
echo
echo "== $problem   (full budget alone)"
"$bin" run --chat -p "$problem" -n 320
echo
echo "== $problem   (think at 0.5, answer at full, one loaded copy)"
"$bin" run --chat -p "$problem" -n 320 --think-budget 0.5 --answer-budget full
