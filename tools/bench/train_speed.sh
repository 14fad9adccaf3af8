#!/usr/bin/env bash
# Training throughput: `elastica train` against the PyTorch CPU reference (same model shape, batch,
# sequence, threads), one after the other. Needs the zero-shot elastic file and .venv-ref
# (scripts/setup-ref-env.sh). Prints both JSON results (with each side's peak RSS) and the ratio.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
m=.cache/zero-shot/width.gguf
[ -f "$m" ] || tools/results/smollm2_zero_shot.sh
cargo build --release --quiet
out=.cache/train-speed
# Peak RSS of each side: GNU time's %M (KiB), where installed.
tm=()
[ -x /usr/bin/time ] && tm=(/usr/bin/time -f %M -o "$out.rss")
mkdir -p "$(dirname "$out")"
"${tm[@]}" ./target/release/elastica train "$m" --data data/train.txt --eval-data data/eval.txt --budgets full --tokens 8192 --stage1 1 \
  --seq 256 --batch 4 --eval-every 0 --eval-seqs 0 --ckpt-every 0 --out "$out" --force --no-progress -t 2 > /dev/null
e=$(python3 - "$out/log.jsonl" <<'PY'
import json, sys
v = sorted(json.loads(l)["tok_per_s"] for l in open(sys.argv[1]) if "tok_per_s" in l)[2:]
print(v[len(v) // 2])
PY
)
er=$(cat "$out.rss" 2>/dev/null || echo null)
[ -x /usr/bin/time ] && tm=(/usr/bin/time -f %M -o "$out.torch.rss")
t=$("${tm[@]}" .venv-ref/bin/python tools/bench/train_step_torch.py --batch 4 --seq 256 --steps 6 --threads 2)
tr=$(cat "$out.torch.rss" 2>/dev/null || echo null)
echo "{\"elastica_tok_per_s\": $e, \"elastica_peak_rss_kib\": $er, \"pytorch\": $t, \"pytorch_peak_rss_kib\": $tr}"
python3 -c "import json,sys; t=json.loads(sys.argv[2]); print(f'ratio elastica/pytorch: {float(sys.argv[1])/t[\"tok_per_s\"]:.2f}x')" "$e" "$t"
