#!/usr/bin/env python3
"""Tables and figure input of the budget-control results (budget_control.py's results.jsonl).

    python3 tools/reasoning/report.py OUT/results.jsonl [--md OUT.md] [--points POINTS.json]

Markdown: every single budget by thinking cap, every (think S, answer L) pairing by hand-off and
cap, and the dominance check: for each S→L run with S smaller than L, the best accuracy L alone
reaches at no more latency, and whether S→L beats it. POINTS.json is the input of the Pareto
figure (`cargo run --release --example pareto -- POINTS.json PNG`). Standard library only.
"""

import argparse
import json

ORDER = {"full": 0, "0.75": 1, "0.5": 2}


def cap_name(r):
    if r["no_think"]:
        return "no thinking"
    return f"cap {r['cap']}" if r["cap"] else "uncapped"


def cap_key(r):
    return (-1 if r["no_think"] else (r["cap"] or 10**9))


def levels(r):
    by = r.get("by_level") or {}
    return " / ".join(f"{by[k]['accuracy'] * 100:.0f}" for k in sorted(by))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--md")
    ap.add_argument("--points")
    a = ap.parse_args()
    rs = [json.loads(l) for l in open(a.results) if l.strip()]
    single = [r for r in rs if r["no_think"] or r["think"] == r["answer"]]
    pairs = [r for r in rs if not r["no_think"] and r["think"] != r["answer"]]
    bo = lambda b: ORDER.get(b, 9)
    out = []
    w = out.append
    w("### Each budget alone\n")
    w("| budget | thinking | accuracy | by level 1 / 2 / 3 / 4 (%) | ms per problem | thinking tokens | tokens |")
    w("|---|---|---:|---|---:|---:|---:|")
    for r in sorted(single, key=lambda r: (bo(r["answer"]), cap_key(r))):
        w(f"| {r['answer']} | {cap_name(r)} | {r['accuracy'] * 100:.1f}% | {levels(r)} | "
          f"{r['seconds'] * 1000:.1f} | {r['thinking_tokens']:.1f} | {r['tokens']:.1f} |")
    w("\n### Think at S, answer at L\n")
    w("| think S | answer L | hand-off | thinking | accuracy | by level 1 / 2 / 3 / 4 (%) | ms per problem | thinking tokens |")
    w("|---|---|---|---|---:|---|---:|---:|")
    for r in sorted(pairs, key=lambda r: (bo(r["think"]), bo(r["answer"]), r["handoff"], cap_key(r))):
        w(f"| {r['think']} | {r['answer']} | {r['handoff']} | {cap_name(r)} | "
          f"{r['accuracy'] * 100:.1f}% | {levels(r)} | {r['seconds'] * 1000:.1f} | "
          f"{r['thinking_tokens']:.1f} |")
    # Dominance: S→L (S smaller) against L alone with any thinking setting at <= latency.
    w("\n### Does S→L beat L alone?\n")
    w("For each run that thinks at a smaller budget S and answers at L: the best accuracy L "
      "alone reaches (any thinking setting) at no more latency per problem.\n")
    w("| S→L | hand-off | thinking | accuracy | ms | best L alone at ≤ ms | its setting | S→L ahead by |")
    w("|---|---|---|---:|---:|---:|---|---:|")
    wins = []
    for r in sorted(pairs, key=lambda r: (bo(r["answer"]), bo(r["think"]), r["handoff"], cap_key(r))):
        if bo(r["think"]) <= bo(r["answer"]):
            continue  # only a smaller budget thinking
        alone = [x for x in single if x["answer"] == r["answer"] and x["seconds"] <= r["seconds"]]
        if alone:
            best = max(alone, key=lambda x: x["accuracy"])
            d = r["accuracy"] - best["accuracy"]
            if d > 0:
                wins.append((r, best, d))
            w(f"| {r['think']}→{r['answer']} | {r['handoff']} | {cap_name(r)} | "
              f"{r['accuracy'] * 100:.1f}% | {r['seconds'] * 1000:.1f} | "
              f"{best['accuracy'] * 100:.1f}% | {cap_name(best)} | {d * 100:+.1f} pt |")
        else:
            w(f"| {r['think']}→{r['answer']} | {r['handoff']} | {cap_name(r)} | "
              f"{r['accuracy'] * 100:.1f}% | {r['seconds'] * 1000:.1f} | — | no L-alone run is this fast | — |")
    w("")
    if wins:
        w(f"S→L is ahead of L alone at matched latency in {len(wins)} of the runs above.")
    else:
        w("S→L is ahead of L alone at matched latency in none of the runs above.")
    text = "\n".join(out) + "\n"
    if a.md:
        open(a.md, "w").write(text)
    else:
        print(text)
    if a.points:
        groups = {}
        for r in rs:
            if r["no_think"] or r["think"] == r["answer"]:
                g = f"{r['answer']} alone"
            else:
                g = f"{r['think']} → {r['answer']} ({r['handoff']})"
            groups.setdefault(g, []).append([r["seconds"] * 1000, r["accuracy"]])
        pts = {
            "title": "Budget control on the held-out problems",
            "x": "mean latency per problem (ms)",
            "y": "accuracy",
            "groups": [{"name": k, "points": v} for k, v in groups.items()],
        }
        json.dump(pts, open(a.points, "w"), indent=1)


if __name__ == "__main__":
    main()
