#!/usr/bin/env python3
"""Markdown tables for docs/results/quantize.md from tools/results/quantize.sh's work dir:
held-out perplexity per format and budget, recovery against BF16, file sizes, decode tok/s."""
import json
import statistics
import sys

w = sys.argv[1] if len(sys.argv) > 1 else ".cache/quantize"
rows = [json.loads(l) for f in ("ppl", "bench") for l in open(f"{w}/{f}.jsonl")]
labels = ["bf16", "fp8", "nvfp4-ptq", "nvfp4-qad"]
names = {"bf16": "BF16", "fp8": "FP8 PTQ", "nvfp4-ptq": "NVFP4 PTQ", "nvfp4-qad": "NVFP4 QAD"}
budgets = ["full", "0.75", "0.5"]
ppl = {(r["label"], r["budget"]): r["ppl"] for r in rows if "ppl" in r}
size = {r["label"]: r["bytes"] for r in rows if "bytes" in r}
tg = {}
bpt = {}
by_round = {}
for r in rows:
    if "bench" in r:
        tg.setdefault((r["label"], r["budget"]), []).append(r["bench"]["tg"])
        bpt[(r["label"], r["budget"])] = r["bench"]["bytes_per_token"]
        by_round[(r["label"], r["budget"], r["round"])] = r["bench"]["tg"]
rounds = sorted({k[2] for k in by_round})


def speedup(l, b):
    """Median over rounds of the format's tok/s over BF16's in the same round and budget."""
    return statistics.median(by_round[(l, b, k)] / by_round[("bf16", b, k)] for k in rounds)

qad = json.load(open(f"{w}/qad/summary.json"))
log = [json.loads(l) for l in open(f"{w}/qad/log.jsonl")]
spent = {}
seen = 0
step_s = 0.0
for d in log:
    if "budget" in d:
        spent[d["budget"]] = spent.get(d["budget"], 0) + d["tokens"] - seen
        step_s += (d["tokens"] - seen) / d["tok_per_s"]
        seen = d["tokens"]

out = []
p = out.append
p("| budget | architecture | BF16 | FP8 PTQ | NVFP4 PTQ | NVFP4 QAD |")
p("|---|---|---:|---:|---:|---:|")
arch = {b["name"]: b["spec"] for b in qad["budgets"]}
for b in budgets:
    cells = [f"{ppl[(l, b)]['ppl']:.2f}" for l in labels]
    p(f"| {b} | `{ppl[('bf16', b)]['budget']}` | " + " | ".join(cells) + " |")
p("")
p("Recovery against BF16, as BF16 perplexity / format perplexity (100% = no loss), and the share")
p("of NVFP4 PTQ's loss that QAD won back:")
p("")
p("| budget | FP8 PTQ | NVFP4 PTQ | NVFP4 QAD | QAD recovers of PTQ's loss |")
p("|---|---:|---:|---:|---:|")
for b in budgets:
    base = ppl[("bf16", b)]["ppl"]
    rec = [f"{100 * base / ppl[(l, b)]['ppl']:.1f}%" for l in labels[1:]]
    ptq, qd = ppl[("nvfp4-ptq", b)]["ppl"], ppl[("nvfp4-qad", b)]["ppl"]
    won = 100 * (ptq - qd) / (ptq - base) if ptq != base else float("nan")
    p(f"| {b} | " + " | ".join(rec) + f" | {won:.0f}% |")
p("")
p(f"QAD: {qad['tokens']} tokens ({qad['steps']} steps, {step_s / 60:.1f} min of step time on this CPU), "
  + ", ".join(f"{b} {spent.get(b, 0)}" for b in budgets) + " per budget; QAD's learned architectures: "
  + ", ".join(f"{n} `{s}`" for n, s in arch.items()) + ".")
p("")
p("| format | model.safetensors | bytes read per token (full / 0.75 / 0.5) | decode tok/s (full / 0.75 / 0.5) | vs BF16, same round (full / 0.75 / 0.5) | bytes ratio (full / 0.75 / 0.5) | speedup / bytes ratio (full) |")
p("|---|---:|---|---|---|---|---:|")
for l in labels:
    t = {b: statistics.median(tg[(l, b)]) for b in budgets}
    by = " / ".join(f"{bpt[(l, b)] / 2**20:.0f} MiB" for b in budgets)
    ts = " / ".join(f"{t[b]:.1f}" for b in budgets)
    sp = " / ".join(f"{speedup(l, b):.2f}x" for b in budgets)
    br = " / ".join(f"{bpt[('bf16', b)] / bpt[(l, b)]:.2f}x" for b in budgets)
    frac = speedup(l, "full") / (bpt[("bf16", "full")] / bpt[(l, "full")])
    p(f"| {names[l]} | {size[l] / 2**20:.1f} MiB | {by} | {ts} | {sp} | {br} | {frac:.2f} |")
print("\n".join(out))
