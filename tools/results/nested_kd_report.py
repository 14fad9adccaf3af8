"""Markdown table for docs/results/smollm2-nested-kd.md from tools/results/smollm2_nested_kd.sh's
work dir: held-out perplexity before/after per budget, and each run's tokens and throughput."""
import json, os, sys

w = sys.argv[1] if len(sys.argv) > 1 else ".cache/nested-kd"
rows = [json.loads(l) for l in open(f"{w}/ppl.jsonl")]
ppl = {(r["label"], r["budget"]): r["result"]["ppl"] for r in rows}
names = ["nested", "single-0.75", "single-0.5", "parity-0.75", "parity-0.5"]
runs = {n: json.load(open(f"{w}/{n}/summary.json")) for n in names if os.path.exists(f"{w}/{n}/summary.json")}


def tokens_on(name, budget):
    """Tokens the run trained `budget` on: each step's increase of the cumulative `tokens`."""
    n, seen = 0, 0
    for l in open(f"{w}/{name}/log.jsonl"):
        d = json.loads(l)
        if "budget" in d:
            if d["budget"] == budget:
                n += d["tokens"] - seen
            seen = d["tokens"]
    return n


PARITY = "single-budget KD, nested's tokens"


def cell(label, b):
    v = ppl.get((label, b))
    return f"{v:.2f}" if v else "—"


print("| budget | spec after training | before (zero-shot) | nested KD | single-budget KD, nested's total tokens | single-budget KD, nested's tokens on that budget |")
print("|---|---|---:|---:|---:|---:|")
for b in ["full", "0.75", "0.5"]:
    spec = next(x["spec"] for x in runs["nested"]["budgets"] if x["name"] == b)
    print(f"| {b} | `{spec}` | {cell('before (zero-shot elastic)', b)} | {cell('nested KD', b)} | "
          f"{cell('single-budget KD', b)} | {cell(PARITY, b)} |")
print()


def step_seconds(name):
    """Seconds spent in training steps (evals and checkpoints excluded), summed over the log, so
    that a resumed run counts every invocation (summary.json times only the last one)."""
    t, seen = 0.0, 0
    for l in open(f"{w}/{name}/log.jsonl"):
        d = json.loads(l)
        if "budget" in d:
            t += (d["tokens"] - seen) / d["tok_per_s"]
            seen = d["tokens"]
    return t


print("| run | steps | tokens | tokens per budget | step s | tok/s in steps |")
print("|---|---:|---:|---|---:|---:|")
for n, s in runs.items():
    per = ", ".join(f"{b}: {tokens_on(n, b)}" for b in ["full", "0.75", "0.5"] if tokens_on(n, b))
    t = step_seconds(n)
    print(f"| {n} | {s['steps']} | {s['tokens']} | {per} | {t:.0f} | {s['tokens'] / t:.1f} |")
