#!/usr/bin/env bash
# Serving benchmark: `elastica serve` against llama.cpp's `llama-server` on the same GGUF, driven by
# the same closed-loop load generator (tools/bench/serve_load.py: C clients, each sending its
# requests one after another, streaming, temperature 0, ignore_eos, exactly -g tokens each).
# For every round and every concurrency C, each server is started fresh with C sequences at once
# (llama-server -np C -c C*CTX, elastica --parallel C --ctx CTX), warmed up with one request, loaded,
# its peak RSS (VmHWM) read, and stopped. The order of the two servers alternates from round to
# round. The table gives each engine's median over the rounds.
#
# Usage: scripts/serve-bench.sh [-r ROUNDS] [-n "1 4 16 64"] [-m MODEL.gguf] [-t THREADS]
#                               [-q REQS_PER_CLIENT] [-g TOKENS] [-c CTX] [-o llama|elastica] [-d OUTDIR]
#   -r  rounds (default 3)               -n  concurrencies (default "1 4 16 64")
#   -m  GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf)   -t  threads per server (default 2)
#   -q  requests per client (default 4; at least 8 requests in all at every C)
#   -g  completion tokens per request (default 128)   -c  context per sequence (default 512)
#   -o  run only one server (llama or elastica; `--only X` works too); output then defaults to bench-out/serve
#   -d  output folder (default docs/results): writes serve.md and serve.json there
#   -W  before each run, wait up to this many seconds for the machine to be quiet (other processes
#       under 15% of the CPUs; default 300, 0: do not wait). The CPU time other processes took during
#       each run is recorded; a run where it passed 10% of the machine (or 40% for 4 s) is redone, up to
#       -a times (default 3; the last attempt stands, and is listed in the output if still disturbed).
# llama-server runs with prompt caching off (--no-cache-prompt --cache-ram 0): elastica has no
# prefix cache, and the load repeats a few fixed prompts. Set LLAMA_EXTRA="..." to add flags.
# Logs of every server and every load run: bench-out/serve/. ELASTICA=BINARY replaces target/release/elastica.
# Needs target/release/elastica (cargo build --release) unless -o llama; builds llama-server
# (scripts/build-llama-cpp.sh) and fetches SmolLM2 when missing.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rounds=3
concs="1 4 16 64"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
threads=2
reqs=4
gen=128
ctx=512
only=""
outdir=""
quiet_max=300
retries=3
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#--only=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]+"${args[@]}"}"
while getopts "r:n:m:t:q:g:c:o:d:W:a:" o; do case $o in
  r) rounds=$OPTARG ;; n) concs=$OPTARG ;; m) model=$OPTARG ;; t) threads=$OPTARG ;;
  q) reqs=$OPTARG ;; g) gen=$OPTARG ;; c) ctx=$OPTARG ;; o) only=$OPTARG ;; d) outdir=$OPTARG ;;
  W) quiet_max=$OPTARG ;; a) retries=$OPTARG ;; *) sed -n '2,26p' "$0" >&2; exit 2 ;; esac; done
case $only in ""|llama|elastica) ;; *) echo "error: -o/--only takes llama or elastica" >&2; exit 2 ;; esac
engines="llama elastica"
[ -n "$only" ] && engines=$only
[ -n "$outdir" ] || { if [ -n "$only" ]; then outdir=bench-out/serve; else outdir=docs/results; fi; }

llama_bin=.cache/llama.cpp/build/bin/llama-server
elastica_bin=${ELASTICA:-target/release/elastica}
if [[ " $engines " == *" llama "* ]] && [ ! -x "$llama_bin" ]; then scripts/build-llama-cpp.sh; fi
if [[ " $engines " == *" elastica "* ]]; then
  "$elastica_bin" serve --help >/dev/null 2>&1 \
    || { echo "error: $elastica_bin serve is missing: build it with cargo build --release" >&2; exit 1; }
fi
if [ ! -f "$model" ]; then
  if [ "$model" = models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then scripts/fetch-model.sh; else echo "error: no $model" >&2; exit 1; fi
fi
# The load generator needs httpx (or httpx2, which the openai venv brings).
py=.cache/venv-openai/bin/python
if ! { [ -x "$py" ] && "$py" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("httpx") or u.find_spec("httpx2")))'; }; then
  py=$(scripts/setup-openai-venv.sh)
fi

logs=bench-out/serve
mkdir -p "$logs" "$outdir"
runs=$logs/runs.jsonl
: >"$runs"
: >"$logs/disturbed.jsonl"

srv_pid=""
stop_server() {
  [ -n "$srv_pid" ] || return 0
  if kill -0 "$srv_pid" 2>/dev/null; then
    kill -TERM "$srv_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$srv_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$srv_pid" 2>/dev/null; then
      echo "warning: server $srv_pid ignored SIGTERM for 10 s; killing it" >&2
      kill -KILL "$srv_pid" 2>/dev/null || true
    fi
  fi
  wait "$srv_pid" 2>/dev/null && srv_rc=0 || srv_rc=$?
  srv_pid=""
}
load_pid=""
trap '[ -z "$load_pid" ] || kill -TERM "$load_pid" 2>/dev/null; stop_server' EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_server ENGINE SLOTS LOG -> sets srv_pid, port; returns 1 when it does not become healthy
start_server() {
  local engine=$1 slots=$2 log=$3
  port=$(free_port)
  if [ "$engine" = llama ]; then
    # shellcheck disable=SC2086
    "$llama_bin" -m "$model" --host 127.0.0.1 --port "$port" -t "$threads" -np "$slots" \
      -c $((slots * ctx)) --no-webui --no-cache-prompt --cache-ram 0 --metrics ${LLAMA_EXTRA:-} >"$log" 2>&1 &
  else
    "$elastica_bin" serve "$model" --host 127.0.0.1 --port "$port" --parallel "$slots" --ctx "$ctx" \
      -t "$threads" >"$log" 2>&1 &
  fi
  srv_pid=$!
  local code
  for _ in $(seq 1200); do
    if ! kill -0 "$srv_pid" 2>/dev/null; then
      wait "$srv_pid" 2>/dev/null && srv_rc=0 || srv_rc=$?
      echo "error: $engine server exited (status $srv_rc) before it was healthy; last lines of $log:" >&2
      tail -n 15 "$log" >&2; srv_pid=""; return 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
    [ "$code" = 200 ] && return 0
    sleep 0.1
  done
  echo "error: $engine server not healthy after 120 s (last GET /health: $code); log $log" >&2
  stop_server; return 1
}

tick=$(getconf CLK_TCK)
ncpu=$(nproc)
busy_ticks() { awk '/^cpu /{ print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
proc_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# wait until other processes use under 15% of the CPUs (sampled over 2 s), at most quiet_max s
wait_quiet() {
  [ "$quiet_max" -gt 0 ] || return 0
  local t0=$SECONDS b0 b1 share said=""
  while :; do
    b0=$(busy_ticks); sleep 2; b1=$(busy_ticks)
    share=$(((b1 - b0) * 100 / (2 * tick * ncpu)))
    [ "$share" -lt 15 ] && return 0
    if [ $((SECONDS - t0)) -ge "$quiet_max" ]; then
      echo "warning: other processes still use $share% of the CPUs after ${quiet_max}s; running anyway" >&2; return 0
    fi
    [ -n "$said" ] || { echo "waiting for the machine to be quiet (other processes use $share% of the CPUs)" >&2; said=1; }
  done
}

rss_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || true; }

# run_once ENGINE C R ROUND TAG ABORTABLE: one run; its record goes to $logs/$TAG.run.json.
# With ABORTABLE=1 the run is abandoned (return 3) as soon as other processes take over 40% of the
# CPUs for two 2-second intervals in a row (llama.cpp's spinning threads slow down many times over
# when they lose their CPUs, so such a run says nothing).
run_once() {
  local engine=$1 c=$2 r=$3 round=$4 tag=$5 abortable=$6 rss_ready b0 s0 w0 b1 s1 w1 lrc hwm rss url
  local pb ps pl nb ns nl share hot=0 aborted=0
  if ! start_server "$engine" "$c" "$logs/$tag.server.log"; then
    printf '{"engine":"%s","round":%d,"clients":%d,"failed":"server did not start (see %s)"}\n' \
      "$engine" "$round" "$c" "$logs/$tag.server.log" >"$logs/$tag.run.json"
    return 0
  fi
  url="http://127.0.0.1:$port"
  rss_ready=$(rss_kib "$srv_pid" VmRSS)
  b0=$(busy_ticks); s0=$(proc_ticks "$srv_pid"); w0=$(date +%s.%N)
  "$py" tools/bench/serve_load.py --url "$url" --clients "$c" --requests-per-client "$r" \
    --max-tokens "$gen" --warmup 1 --label "$engine" >"$logs/$tag.load.json" 2>"$logs/$tag.load.err" &
  load_pid=$!
  pb=$b0; ps=$s0; pl=0
  while kill -0 "$load_pid" 2>/dev/null; do
    sleep 2
    nb=$(busy_ticks); ns=$(proc_ticks "$srv_pid"); nl=$(proc_ticks "$load_pid")
    share=$((((nb - pb) - (ns - ps) - (nl - pl)) * 100 / (2 * tick * ncpu)))
    pb=$nb; ps=$ns; pl=$nl
    if [ "$share" -gt 40 ]; then hot=$((hot + 1)); else hot=0; fi
    if [ "$abortable" = 1 ] && [ "$hot" -ge 2 ]; then
      kill -TERM "$load_pid" 2>/dev/null || true; aborted=1; break
    fi
  done
  wait "$load_pid" && lrc=0 || lrc=$?
  load_pid=""
  b1=$(busy_ticks); s1=$(proc_ticks "$srv_pid"); w1=$(date +%s.%N)
  hwm=$(rss_kib "$srv_pid" VmHWM); rss=$(rss_kib "$srv_pid" VmRSS)
  if [ "$engine" = elastica ]; then curl -s "$url/metrics" >"$logs/$tag.metrics.txt" || true; fi
  stop_server
  if [ "$aborted" = 1 ]; then
    echo "   other processes took over 40% of the CPUs: run abandoned" >&2; return 3
  fi
  cat "$logs/$tag.load.err" >&2
  [ "${srv_rc:-0}" = 0 ] || [ "$engine" = llama ] \
    || echo "warning: elastica serve exited with status $srv_rc after SIGTERM" >&2
  "$py" - "$logs/$tag.load.json" "$engine" "$round" "$c" "$lrc" "${rss_ready:-0}" "${rss:-0}" "${hwm:-0}" "${srv_rc:-0}" \
    "$((b1 - b0))" "$((s1 - s0))" "$w0" "$w1" "$tick" "$ncpu" >"$logs/$tag.run.json" <<'PY'
import json, sys
f, engine, rnd, c, lrc, rss0, rss, hwm, src, busy, srv, w0, w1, tick, ncpu = sys.argv[1:]
try:
    rep = json.loads(open(f).readline())
except Exception:
    rep = {"failed": f"load generator gave no report (exit {lrc})"}
wall = float(w1) - float(w0)
busy_s, srv_s = int(busy) / int(tick), int(srv) / int(tick)
other_s = max(0.0, busy_s - srv_s - (rep.get("client_cpu_total_s") or 0))
rep.update(engine=engine, round=int(rnd), clients=int(c), load_rc=int(lrc), rss_ready_kib=int(rss0),
           rss_kib=int(rss), hwm_kib=int(hwm), server_exit=int(src), server_cpu_s=round(srv_s, 2),
           other_cpu_s=round(other_s, 2), other_cpu_share=round(other_s / (wall * int(ncpu)), 3) if wall > 0 else None)
print(json.dumps(rep))
PY
}

for round in $(seq "$rounds"); do
  order=$engines
  [ -z "$only" ] && [ $((round % 2)) -eq 0 ] && order="elastica llama"
  for c in $concs; do
    r=$reqs
    [ $((c * r)) -ge 8 ] || r=$(((8 + c - 1) / c))
    for engine in $order; do
      tag="r${round}-c${c}-${engine}"
      for attempt in $(seq $((retries + 1))); do
        wait_quiet
        echo "== round $round, $c clients x $r requests, $engine$([ "$attempt" -gt 1 ] && echo " (attempt $attempt)")" >&2
        abortable=0; [ "$attempt" -le "$retries" ] && abortable=1
        run_once "$engine" "$c" "$r" "$round" "$tag" "$abortable" && rc=0 || rc=$?
        [ "$rc" = 3 ] && continue
        share=$(python3 -c 'import json,sys; print(int(100 * (json.load(open(sys.argv[1])).get("other_cpu_share") or 0)))' "$logs/$tag.run.json")
        if [ "$share" -gt 10 ] && [ "$attempt" -le "$retries" ]; then
          echo "   other processes took $share% of the CPUs during the run: redoing it" >&2
          cat "$logs/$tag.run.json" >>"$logs/disturbed.jsonl"
          continue
        fi
        break
      done
      cat "$logs/$tag.run.json" >>"$runs"
    done
  done
done

llama_ver=$("$llama_bin" --version 2>&1 | grep -m1 -i version || true)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
"$py" - "$runs" "$outdir" "$threads" "$gen" "$ctx" "$model" "$rounds" "$llama_ver" "$commit" "$cpu" "${LLAMA_EXTRA:-}" "$(nproc)" <<'PY'
import json, sys, os, statistics
runs, outdir, threads, gen, ctx, model, rounds, llama_ver, commit, cpu, extra, ncpu = sys.argv[1:]
rows = [json.loads(l) for l in open(runs) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r["clients"], {}).setdefault(r["engine"], []).append(r)
keys = ["tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "latency_p50_ms", "latency_p99_ms", "tpot_p50_ms", "hwm_kib", "rss_kib", "rss_ready_kib"]
def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None and not r.get("failed")]
    return statistics.median(v) if v else None
summary = {}
for c, es in sorted(by.items()):
    for e, rs in es.items():
        s = {k: med(rs, k) for k in keys}
        s["rounds"] = len(rs)
        s["ok_rounds"] = sum(1 for r in rs if not r.get("failed") and r.get("ok"))
        s["errors"] = sum(r.get("errors", 0) for r in rs)
        s["mismatches"] = sum(r.get("mismatches", 0) for r in rs)
        s["usage_missing"] = sum(r.get("usage_missing", 0) for r in rs)
        s["failed"] = [r["failed"] for r in rs if r.get("failed")]
        summary.setdefault(str(c), {})[e] = s
engines = [e for e in ("llama", "elastica") if any(e in es for es in by.values())]
name = {"llama": "llama-server", "elastica": "elastica"}
def f1(x): return "–" if x is None else f"{x:.1f}"
def f0(x): return "–" if x is None else f"{x:.0f}"
def mib(x): return "–" if x is None else f"{x / 1024:.0f}"
def ratio(a, b): return "–" if not a or b is None else f"{b / a:.2f}x"
nreq = {c: max(r.get("requests", 0) for r in [x for es in by[c].values() for x in es]) for c in by}
lines = [
    f"# Serving: elastica serve against llama-server ({os.path.basename(model)})",
    "",
    f"Closed loop: C clients, each sending its requests one after another (POST /v1/completions, streamed, "
    f"temperature 0, ignore_eos, {gen} completion tokens, prompts of about 100 tokens); "
    f"{threads} threads; each server started per run with C sequences at once (context {ctx} per sequence); "
    f"medians of {rounds} interleaved rounds. tok/s = completion tokens of all requests / wall time of the run.",
    "",
]
if len(engines) == 2:
    lines += ["| clients | requests | llama-server tok/s | elastica tok/s | ratio | TTFT p50 ms (llama / elastica) | "
              "latency p50 ms (llama / elastica) | latency p99 ms (llama / elastica) | peak RSS MiB (llama / elastica) |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(by):
        l, e = summary[str(c)].get("llama", {}), summary[str(c)].get("elastica", {})
        g = lambda d, k: d.get(k)
        lines.append(f"| {c} | {nreq[c]} | {f1(g(l,'tok_s'))} | {f1(g(e,'tok_s'))} | {ratio(g(l,'tok_s'), g(e,'tok_s'))} | "
                     f"{f0(g(l,'ttft_p50_ms'))} / {f0(g(e,'ttft_p50_ms'))} | {f0(g(l,'latency_p50_ms'))} / {f0(g(e,'latency_p50_ms'))} | "
                     f"{f0(g(l,'latency_p99_ms'))} / {f0(g(e,'latency_p99_ms'))} | {mib(g(l,'hwm_kib'))} / {mib(g(e,'hwm_kib'))} |")
    per_round = {}
    for r in rows:
        per_round.setdefault((r["clients"], r["round"]), {})[r["engine"]] = r.get("tok_s")
    lines += ["", "tok/s ratio (elastica / llama-server) in each round, the two measured back to back:", "",
              "| clients | rounds |", "|---:|---|"]
    for c in sorted(by):
        cells = [ratio(per_round[(c, k)].get("llama"), per_round[(c, k)].get("elastica"))
                 for k in sorted(x for (cc, x) in per_round if cc == c)]
        lines.append(f"| {c} | {' / '.join(cells)} |")
else:
    e = engines[0]
    lines += [f"| clients | requests | {name[e]} tok/s | req/s | TTFT p50 / p99 ms | latency p50 / p99 ms | TPOT p50 ms | peak RSS MiB |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in sorted(by):
        s = summary[str(c)][e]
        lines.append(f"| {c} | {nreq[c]} | {f1(s['tok_s'])} | {'–' if s['req_s'] is None else format(s['req_s'], '.2f')} | "
                     f"{f0(s['ttft_p50_ms'])} / {f0(s['ttft_p99_ms'])} | {f0(s['latency_p50_ms'])} / {f0(s['latency_p99_ms'])} | "
                     f"{f1(s['tpot_p50_ms'])} | {mib(s['hwm_kib'])} |")
notes = []
for c in sorted(by):
    for e in engines:
        s = summary[str(c)].get(e)
        if not s:
            continue
        if s["failed"]:
            notes.append(f"- {name[e]}, {c} clients: {len(s['failed'])} run(s) failed: {s['failed'][0]}")
        if s["errors"]:
            notes.append(f"- {name[e]}, {c} clients: {s['errors']} failed request(s) over the rounds")
        if s["mismatches"]:
            notes.append(f"- {name[e]}, {c} clients: {s['mismatches']} request(s) without exactly {gen} completion tokens")
        if s["usage_missing"]:
            notes.append(f"- {name[e]}, {c} clients: {s['usage_missing']} request(s) without a usage chunk (tokens counted as text chunks)")
busy_runs = [r for r in rows if (r.get("other_cpu_share") or 0) > 0.10]
for r in busy_runs:
    notes.append(f"- {name[r['engine']]}, {r['clients']} clients, round {r['round']}: other processes took "
                 f"{100 * r['other_cpu_share']:.0f}% of the CPUs during the run (figures disturbed)")
for r in rows:
    if r["engine"] == "elastica" and r.get("server_exit"):
        notes.append(f"- elastica, {r['clients']} clients, round {r['round']}: the server exited with status {r['server_exit']} after SIGTERM")
shares = [r["other_cpu_share"] for r in rows if r.get("other_cpu_share") is not None]
lines += ["", "TTFT: time to the first streamed chunk with text. Latency: request sent to stream closed. "
          "Peak RSS: VmHWM of the server process after its run (model, KV/state for C sequences, buffers). "
          + (f"llama-server ({llama_ver}): `-t {threads} -np C -c C*{ctx} --no-webui --no-cache-prompt --cache-ram 0 --metrics{(' ' + extra) if extra else ''}` "
             "(continuous batching on by default). " if "llama" in engines else "")
          + (f"elastica: `serve --parallel C --ctx {ctx} -t {threads}`. " if "elastica" in engines else "")
          + f"Code at {commit}; {ncpu} CPUs ({cpu})"
          + (f"; other processes took at most {100 * max(shares):.0f}% of the CPUs during a run." if shares else ".")]
if notes:
    lines += ["", "Problems:", ""] + notes
else:
    lines += ["", f"Every request of every run returned exactly {gen} completion tokens (from the usage chunk); no errors."]
text = "\n".join(lines) + "\n"
print(text)
with open(os.path.join(outdir, "serve.md"), "w") as f:
    f.write(text)
with open(os.path.join(outdir, "serve.json"), "w") as f:
    json.dump({"model": os.path.basename(model), "threads": int(threads), "max_tokens": int(gen), "ctx_per_seq": int(ctx),
               "rounds": int(rounds), "llama_server": llama_ver, "llama_server_flags": f"-np C -c C*{ctx} --no-webui --no-cache-prompt --cache-ram 0 --metrics {extra}".strip(),
               "commit": commit, "summary": summary, "runs": rows}, f, indent=1)
    f.write("\n")
print(f"wrote {outdir}/serve.md and {outdir}/serve.json", file=sys.stderr)
PY
