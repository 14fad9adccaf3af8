#!/usr/bin/env bash
# The real pretrained example: fetch SmolLM2-135M-Instruct, build elastica, make the model elastic
# (rank + elastify: budgets full, 0.75, 0.5 in one file; once), serve every budget from one loaded
# copy with the OpenAI-compatible server, ask the same question at each budget through the API, and
# stop the server.
# Usage: scripts/smollm2-serve.sh ["your question"]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch-model.sh
cargo build --release --quiet
bin=./target/release/elastica
src=models/SmolLM2-135M-Instruct.Q4_1.gguf
el=models/SmolLM2-135M-Instruct.elastic.gguf
if [ ! -f "$el" ]; then
  echo "making $src elastic (about a minute)..." >&2
  "$bin" rank "$src" --calib tests/fixtures/text/gpl-3.txt --samples 8 --seq 128 \
    --out models/.importance.json >&2
  "$bin" elastify "$src" --importance models/.importance.json --budgets full,0.75,0.5 --out "$el" >&2
fi
question="${1:-In two sentences, what is a nested (many-in-one) language model?}"
log=$(mktemp)
"$bin" serve "$el" --alias smol --port 0 --parallel 4 --quiet 2>"$log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"' EXIT
url=""
for _ in $(seq 600); do
  url=$(sed -n 's|^listening on \(http://[^ ]*\).*|\1|p' "$log")
  if [ -n "$url" ] && curl -sf "$url/health" >/dev/null; then break; fi
  kill -0 $pid 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.2
done
echo "serving $el at $url (model ids: $(curl -s "$url/v1/models" | python3 -c 'import json,sys; print(", ".join(m["id"] for m in json.load(sys.stdin)["data"]))'))"
for budget in full 0.75 0.5; do
  body=$(python3 -c 'import json,sys; print(json.dumps({"model": "smol:" + sys.argv[1], "messages": [{"role": "user", "content": sys.argv[2]}], "max_tokens": 120, "temperature": 0}))' "$budget" "$question")
  curl -s "$url/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" | python3 -c '
import json, sys
r = json.load(sys.stdin)
t = r["timings"]
print("\n== smol:{} ({}, {} tokens, {:.0f} tok/s)".format(sys.argv[1], t["phases"][0]["budget"],
      r["usage"]["completion_tokens"], t["predicted_per_second"]))
print(r["choices"][0]["message"]["content"])' "$budget"
done
