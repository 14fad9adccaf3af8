"""Markdown table for docs/results/smollm2-nested-kd.md from tools/results/smollm2_nested_kd.sh's
work dir: held-out perplexity before/after per budget, and each run's tokens and throughput."""
import json, sys

w = sys.argv[1] if len(sys.argv) > 1 else ".cache/nested-kd"
rows = [json.loads(l) for l in open(f"{w}/ppl.jsonl")]
ppl = {(r["label"], r["budget"]): r["result"]["ppl"] for r in rows}
runs = {n: json.load(open(f"{w}/{n}/summary.json")) for n in ["nested", "single-0.75", "single-0.5"]}


def tokens_on(name, budget):
    n = 0
    for l in open(f"{w}/{name}/log.jsonl"):
        d = json.loads(l)
        if d.get("budget") == budget:
            n += 1024  # every step is batch x seq = 1024 tokens in both stages
    return n


print("| budget | spec after training | before (zero-shot) | nested KD | single-budget KD |")
print("|---|---|---:|---:|---:|")
for b in ["full", "0.75", "0.5"]:
    spec = next(x["spec"] for x in runs["nested"]["budgets"] if x["name"] == b)
    single = ppl.get(("single-budget KD", b))
    s = f"{single:.2f}" if single else "—"
    print(f"| {b} | `{spec}` | {ppl[('before (zero-shot elastic)', b)]:.2f} | {ppl[('nested KD', b)]:.2f} | {s} |")
print()
print("| run | steps | tokens | tokens per budget | wall s | tok/s |")
print("|---|---:|---:|---|---:|---:|")
for n, s in runs.items():
    per = ", ".join(f"{b}: {tokens_on(n, b)}" for b in ["full", "0.75", "0.5"] if tokens_on(n, b))
    print(f"| {n} | {s['steps']} | {s['tokens']} | {per} | {s['seconds']:.0f} | {s['tok_per_s']:.1f} |")
