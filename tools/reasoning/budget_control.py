#!/usr/bin/env python3
"""Elastic budget control on the reasoning test set (issue 14, point 5): held-out accuracy and
mean latency per problem for

  - every single budget B: thinking off, thinking capped at each of --caps tokens, uncapped;
  - every (think S, answer L) pairing with S != L, both hand-offs (shared, reprefill), each cap
    of --pair-caps and uncapped.

Each configuration is one `elastica run --prompts TEST.jsonl --chat` (one model load, problems
one after another, greedy). Latency is the wall time of a problem inside that run (prefill,
thinking, hand-off, answer). A capped run forces "\\n</think>" (what the truncated training
documents end their cut trace with) once the cap is reached.

    python3 tools/reasoning/budget_control.py MODEL TEST.jsonl OUT [--budgets full,0.75,0.5]
        [--caps 8,16,32,64] [--pair-caps 16,32] [--limit N] [--threads T] [--jobs J] [--bin PATH]

--jobs runs J configurations at once (each its own process with --threads threads): for a model
that fits in the caches, as the tiny reasoning model does, they barely disturb each other.

Writes OUT/runs/NAME.jsonl (raw outputs; a configuration whose file is complete is not run
again) and OUT/results.jsonl (one line per configuration). Standard library only.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import score  # noqa: E402

END = "\n</think>"


def configs(budgets, caps, pair_caps):
    """(name, fields, elastica arguments) of every configuration."""
    out = []
    for b in budgets:
        out.append((f"{b}-nothink", dict(think=None, answer=b, cap=0, handoff=None),
                    ["--budget", b, "--no-thinking"]))
        for c in caps + [None]:
            args = ["--think-budget", b, "--answer-budget", b, "--think-end", END]
            if c:
                args += ["--thinking-tokens", str(c)]
            out.append((f"{b}-cap{c or 'none'}", dict(think=b, answer=b, cap=c, handoff=None), args))
    for s in budgets:
        for l in budgets:
            if s == l:
                continue
            for h in ("shared", "reprefill"):
                for c in pair_caps + [None]:
                    args = ["--think-budget", s, "--answer-budget", l, "--handoff", h,
                            "--think-end", END]
                    if c:
                        args += ["--thinking-tokens", str(c)]
                    out.append((f"{s}-to-{l}-{h}-cap{c or 'none'}",
                                dict(think=s, answer=l, cap=c, handoff=h), args))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("test")
    ap.add_argument("out")
    ap.add_argument("--budgets", default="full,0.75,0.5")
    ap.add_argument("--caps", default="8,16,32,64")
    ap.add_argument("--pair-caps", default="16,32")
    ap.add_argument("--limit", type=int, default=0, help="first N test problems only")
    ap.add_argument("--threads", type=int, default=0, help="elastica -t (0: its default)")
    ap.add_argument("--jobs", type=int, default=1, help="configurations run at once")
    ap.add_argument("--max-tokens", type=int, default=320)
    ap.add_argument("--bin", default="target/release/elastica")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]
    test = [json.loads(l) for l in open(a.test) if l.strip()]
    if a.limit:
        test = test[: a.limit]
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    prompts = os.path.join(a.out, "prompts.jsonl")
    with open(prompts + ".tmp", "w") as f:
        for r in test:
            f.write(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n")
    os.replace(prompts + ".tmp", prompts)
    results = []
    cs = configs(a.budgets.split(","), ints(a.caps), ints(a.pair_caps))

    def rows_of(name, args):
        """The configuration's outputs: read back if complete, else run (atomically written)."""
        path = os.path.join(a.out, "runs", name + ".jsonl")
        if os.path.exists(path):
            rows = [json.loads(l) for l in open(path) if l.strip()]
            if len(rows) == len(test):
                return rows
        cmd = [a.bin, "run", a.model, "--prompts", prompts, "--chat", "-n", str(a.max_tokens)]
        if a.threads:
            cmd += ["-t", str(a.threads)]
        p = subprocess.run(cmd + args, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd + args)} failed:\n{p.stderr}")
        rows = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
        with open(path + ".tmp", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(path + ".tmp", path)
        return rows

    with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        runs = [pool.submit(rows_of, name, args) for name, _, args in cs]
        for i, ((name, fields, _), run) in enumerate(zip(cs, runs)):
            rows = run.result()
            s = score.score(test, {r["id"]: r["text"] for r in rows})
            think_tokens = [sum(ph["tokens"] for ph in r.get("phases", [])
                                if ph["phase"] == "thinking") for r in rows]
            res = dict(
                name=name,
                **fields,
                no_think=fields["think"] is None,
                n=len(rows),
                accuracy=s["accuracy"],
                by_level=s.get("by_level"),
                by_family=s.get("by_family"),
                seconds=sum(r["seconds"] for r in rows) / len(rows),
                tokens=sum(len(r["tokens"]) for r in rows) / len(rows),
                thinking_tokens=sum(think_tokens) / len(rows),
            )
            results.append(res)
            print(f"[{i + 1}/{len(cs)}] {name}: accuracy {res['accuracy']:.3f}, "
                  f"{res['seconds'] * 1000:.1f} ms/problem, {res['tokens']:.1f} tokens",
                  file=sys.stderr)
    out = os.path.join(a.out, "results.jsonl")
    with open(out + ".tmp", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in results))
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()
