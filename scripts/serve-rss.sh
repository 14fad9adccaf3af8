#!/usr/bin/env bash
# Memory of serving every budget of an elastic model from one process, against serving the full
# budget alone and against one process per sliced model. Three setups, the same load in each
# (tools/bench/serve_load.py: C clients x R requests of G tokens, streamed, ignore_eos):
#   (a) one `elastica serve MODEL`, every request to the full budget (model NAME, the first id of
#       GET /v1/models);
#   (b) one `elastica serve MODEL`, the requests spread over all its budgets (NAME, NAME:B1, NAME:B2, ...
#       from GET /v1/models, one id per budget; request j of client i goes to id (i + j) mod m);
#   (c) the manifest's budgets cut out with `elastica slice MODEL --budget B`, one `elastica serve`
#       per slice plus one for the full MODEL, side by side, the requests spread over them the same
#       way; memory summed over the processes.
# Reports VmRSS and VmHWM (/proc/PID/status) after the load, plus RssFile (file-backed pages) and the
# RSS once healthy before any request, and the ratios (b)/(a) and (c)/(b).
#
# Usage: scripts/serve-rss.sh MODEL [-c CLIENTS] [-q REQS_PER_CLIENT] [-g TOKENS] [-t THREADS]
#                                   [-x CTX] [-s SLOTS_PER_SLICE] [-o OUT.md]
#   MODEL: an elastic checkpoint with a budget manifest (.gguf or HF folder)
#   -c clients (default 8), also --parallel of (a) and (b)   -q requests per client (default 4)
#   -g completion tokens per request (default 64)   -t threads per server (default 2)
#   -x context per sequence (default 512)
#   -s --parallel of each server in (c) (default: ceil(CLIENTS / servers), the same slots in all)
#   -o markdown output (default docs/results/serve-memory.md; a .json is written next to it)
# Slices are cached in bench-out/serve-rss/slices/ (re-cut when older than MODEL). Logs: bench-out/serve-rss/.
# ELASTICA=BINARY replaces target/release/elastica.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
usage() { sed -n '2,24p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
case $1 in -h|--help) usage ;; esac
model=$1; shift
clients=8
reqs=4
gen=64
threads=2
ctx=512
slots_slice=""
out=docs/results/serve-memory.md
while getopts "c:q:g:t:x:s:o:" o; do case $o in
  c) clients=$OPTARG ;; q) reqs=$OPTARG ;; g) gen=$OPTARG ;; t) threads=$OPTARG ;; x) ctx=$OPTARG ;;
  s) slots_slice=$OPTARG ;; o) out=$OPTARG ;; *) usage ;; esac; done
[ -e "$model" ] || { echo "error: no $model" >&2; exit 1; }
bin=${ELASTICA:-target/release/elastica}
"$bin" serve --help >/dev/null 2>&1 \
  || { echo "error: $bin serve is missing: build it with cargo build --release" >&2; exit 1; }
py=.cache/venv-openai/bin/python
if ! { [ -x "$py" ] && "$py" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("httpx") or u.find_spec("httpx2")))'; }; then
  py=$(scripts/setup-openai-venv.sh)
fi
logs=bench-out/serve-rss
mkdir -p "$logs/slices" "$(dirname "$out")"
runs=$logs/runs.jsonl
: >"$runs"

# The manifest's budgets other than the full one.
info_json=$("$bin" info "$model" --json) || { echo "error: elastica info $model failed" >&2; exit 1; }
mapfile -t budgets < <(python3 -c '
import json, sys
info = json.load(sys.stdin)
parent = info.get("parent", {}).get("spec")
for b in info.get("budgets", []):
    if b["name"] != "full" and b.get("spec") != parent:
        print(b["name"])' <<<"$info_json")
[ ${#budgets[@]} -gt 0 ] || { echo "error: $model has no budget manifest (elastica info lists no budgets besides full)" >&2; exit 1; }
echo "budgets besides full: ${budgets[*]}" >&2

pids=()
stop_all() {
  local p
  for p in "${pids[@]+"${pids[@]}"}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]+"${pids[@]}"}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then echo "warning: server $p ignored SIGTERM for 10 s; killing it" >&2; kill -KILL "$p" 2>/dev/null || true; fi
    wait "$p" 2>/dev/null || echo "warning: server $p exited with status $? after SIGTERM" >&2
  done
  pids=()
}
trap 'stop_all' EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start MODEL SLOTS LOG: starts a server, appends its pid to pids and its URL to urls
urls=()
start() {
  local m=$1 slots=$2 log=$3 port
  port=$(free_port)
  "$bin" serve "$m" --host 127.0.0.1 --port "$port" --parallel "$slots" --ctx "$ctx" -t "$threads" >"$log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$port")
}
# wait until every started server answers GET /health with 200
wait_healthy() {
  local i code
  for i in "${!pids[@]}"; do
    for _ in $(seq 3000); do
      kill -0 "${pids[$i]}" 2>/dev/null || { echo "error: server ${urls[$i]} exited before it was healthy; log:" >&2; tail -n 15 "${logs_of[$i]}" >&2; exit 1; }
      code=$(curl -s -o /dev/null -w '%{http_code}' "${urls[$i]}/health" || true)
      [ "$code" = 200 ] && continue 2
      sleep 0.1
    done
    echo "error: server ${urls[$i]} not healthy after 300 s (GET /health: $code)" >&2; exit 1
  done
}
first_id() { curl -sf "$1/v1/models" | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])'; }
# every id of GET /v1/models, one per budget (the first id naming it: `NAME` and `NAME:full` are the same budget)
all_ids() { curl -sf "$1/v1/models" | python3 -c '
import json, sys
seen, ids = set(), []
for m in json.load(sys.stdin)["data"]:
    key = m.get("budget", m["id"])
    if key not in seen:
        seen.add(key); ids.append(m["id"])
print(",".join(ids))'; }
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mem_json() {  # pids... -> {"vmrss": .., "vmhwm": .., "rssfile": .., "rssanon": ..} summed, KiB
  local p rss=0 hwm=0 file=0 anon=0
  for p in "$@"; do
    rss=$((rss + $(status_kib "$p" VmRSS))); hwm=$((hwm + $(status_kib "$p" VmHWM)))
    file=$((file + $(status_kib "$p" RssFile))); anon=$((anon + $(status_kib "$p" RssAnon)))
  done
  printf '{"vmrss_kib": %d, "vmhwm_kib": %d, "rssfile_kib": %d, "rssanon_kib": %d}' "$rss" "$hwm" "$file" "$anon"
}
# run SETUP SLOTS_EACH URLS MODELS: load, memory, one line of runs.jsonl
run_setup() {
  local setup=$1 slots=$2 u=$3 m=$4 ready=$5 lrc
  echo "== ($setup) ${#pids[@]} server(s), models $m" >&2
  set +e
  "$py" tools/bench/serve_load.py --url "$u" --model "$m" --clients "$clients" --requests-per-client "$reqs" \
    --max-tokens "$gen" --warmup 1 --label "$setup" >"$logs/$setup.load.json" 2>"$logs/$setup.load.err"
  lrc=$?
  set -e
  cat "$logs/$setup.load.err" >&2
  local mem; mem=$(mem_json "${pids[@]}")
  for i in "${!urls[@]}"; do curl -s "${urls[$i]}/metrics" >"$logs/$setup.$i.metrics.txt" || true; done
  python3 - "$logs/$setup.load.json" "$setup" "${#pids[@]}" "$slots" "$m" "$mem" "$ready" "$lrc" >>"$runs" <<'PY'
import json, sys
f, setup, n, slots, models, mem, ready, lrc = sys.argv[1:]
try:
    load = json.loads(open(f).readline())
except Exception:
    load = {"failed": f"load generator gave no report (exit {lrc})"}
keep = {k: load.get(k) for k in ("requests", "ok", "errors", "mismatches", "usage_missing", "tok_s", "ttft_p50_ms",
                                 "latency_p50_ms", "per_model", "error_samples", "mismatch_samples", "failed")}
print(json.dumps({"setup": setup, "servers": int(n), "slots_each": int(slots), "models": models.split(","),
                  "mem": json.loads(mem), "ready_vmrss_kib": int(ready), "load": keep}))
PY
}

declare -a logs_of
# (a) full budget only
start "$model" "$clients" "$logs/a.server.log"; logs_of=("$logs/a.server.log")
wait_healthy
ready=$(status_kib "${pids[0]}" VmRSS)
name=$(first_id "${urls[0]}")
ids=$(all_ids "${urls[0]}")
echo "model ids, one per budget: $ids" >&2
run_setup a "$clients" "${urls[0]}" "$name" "$ready"
stop_all; urls=()

# (b) all budgets from one process
start "$model" "$clients" "$logs/b.server.log"; logs_of=("$logs/b.server.log")
wait_healthy
ready=$(status_kib "${pids[0]}" VmRSS)
ids=$(all_ids "${urls[0]}")
nids=$(tr ',' '\n' <<<"$ids" | wc -l)
[ "$nids" -eq $((${#budgets[@]} + 1)) ] \
  || echo "warning: GET /v1/models lists $nids budgets ($ids) for ${#budgets[@]} manifest budgets besides full" >&2
run_setup b "$clients" "${urls[0]}" "$ids" "$ready"
stop_all; urls=()

# (c) one process per slice, plus the full model
ext=gguf; [ -d "$model" ] && ext=""
slices=()
for b in "${budgets[@]}"; do
  s="$logs/slices/$b${ext:+.$ext}"
  if [ ! -e "$s" ] || [ "$model" -nt "$s" ]; then
    echo "slicing budget $b -> $s" >&2
    "$bin" slice "$model" --budget "$b" --out "$s" -t "$threads" --force >"$logs/slice-$b.log" 2>&1 \
      || { echo "error: elastica slice --budget $b failed:" >&2; tail -n 15 "$logs/slice-$b.log" >&2; exit 1; }
  fi
  slices+=("$s")
done
nserv=$((${#slices[@]} + 1))
[ -n "$slots_slice" ] || slots_slice=$(((clients + nserv - 1) / nserv))
logs_of=()
start "$model" "$slots_slice" "$logs/c.full.server.log"; logs_of+=("$logs/c.full.server.log")
for i in "${!slices[@]}"; do
  start "${slices[$i]}" "$slots_slice" "$logs/c.${budgets[$i]}.server.log"; logs_of+=("$logs/c.${budgets[$i]}.server.log")
done
wait_healthy
ready=0
for p in "${pids[@]}"; do ready=$((ready + $(status_kib "$p" VmRSS))); done
cids=()
for u in "${urls[@]}"; do cids+=("$(first_id "$u")"); done
run_setup c "$slots_slice" "$(IFS=,; echo "${urls[*]}")" "$(IFS=,; echo "${cids[*]}")" "$ready"
stop_all; urls=()

python3 - "$runs" "$out" "$(basename "$model")" "$clients" "$reqs" "$gen" "$threads" "$ctx" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "${budgets[*]}" <<'PY'
import json, os, sys
runs, out, mname, clients, reqs, gen, threads, ctx, commit, budgets = sys.argv[1:]
rows = {r["setup"]: r for r in (json.loads(l) for l in open(runs) if l.strip())}
def mib(k): return f"{k / 1024:.0f}"
desc = {"a": "(a) one `elastica serve`, full budget only",
        "b": "(b) one `elastica serve`, all budgets",
        "c": f"(c) one `elastica serve` per slice + the full model"}
lines = [f"## Memory: one process for every budget against one process per budget ({mname})", "",
         f"The same load in each setup: {clients} clients x {reqs} requests of {gen} completion tokens (streamed, "
         f"temperature 0, ignore_eos, prompts of about 100 tokens), {threads} threads and context {ctx} per sequence "
         f"in every server; the requests of (b) and (c) spread evenly over the budgets full, {', '.join(budgets.split())}. "
         f"Memory from /proc/PID/status after the load, summed over the processes of a setup. Code at {commit}.", "",
         "| setup | processes | slots each | models | VmRSS MiB | VmHWM MiB | of which RssFile MiB | VmRSS when ready MiB | tok/s | errors / mismatches |",
         "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
for s in ("a", "b", "c"):
    r = rows.get(s)
    if not r:
        lines.append(f"| {desc[s]} | – | – | – | – | – | – | – | – | not run |")
        continue
    m, l = r["mem"], r["load"]
    tok = "–" if l.get("tok_s") is None else f"{l['tok_s']:.1f}"
    lines.append(f"| {desc[s]} | {r['servers']} | {r['slots_each']} | {', '.join('`'+x+'`' for x in r['models'])} | "
                 f"{mib(m['vmrss_kib'])} | {mib(m['vmhwm_kib'])} | {mib(m['rssfile_kib'])} | {mib(r['ready_vmrss_kib'])} | {tok} | "
                 f"{l.get('errors')} / {l.get('mismatches')}{' (' + l['failed'] + ')' if l.get('failed') else ''} |")
ratios = []
def ratio(x, y, k):
    if x in rows and y in rows and rows[y]["mem"][k]:
        return rows[x]["mem"][k] / rows[y]["mem"][k]
for k, label in (("vmrss_kib", "VmRSS"), ("vmhwm_kib", "VmHWM")):
    ba, cb = ratio("b", "a", k), ratio("c", "b", k)
    ratios.append(f"{label}: (b)/(a) = {ba:.2f}x, (c)/(b) = {cb:.2f}x" if ba and cb else f"{label}: –")
lines += ["", "Ratios — " + "; ".join(ratios) + "."]
probs = []
for s in ("a", "b", "c"):
    l = rows.get(s, {}).get("load", {})
    for e in l.get("error_samples") or []:
        probs.append(f"- ({s}) request failed: {e}")
    for e in l.get("mismatch_samples") or []:
        probs.append(f"- ({s}) token count mismatch: {e}")
if probs:
    lines += ["", "Problems:", ""] + probs[:10]
text = "\n".join(lines) + "\n"
print(text)
with open(out, "w") as f:
    f.write(text)
with open(os.path.splitext(out)[0] + ".json", "w") as f:
    json.dump({"model": mname, "clients": int(clients), "requests_per_client": int(reqs), "max_tokens": int(gen),
               "threads": int(threads), "ctx_per_seq": int(ctx), "commit": commit, "setups": rows}, f, indent=1)
    f.write("\n")
print(f"wrote {out} and {os.path.splitext(out)[0]}.json", file=sys.stderr)
PY
