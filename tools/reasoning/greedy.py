#!/usr/bin/env python3
"""Records the shipped model's greedy completions of a few fixed held-out problems (one per
family, level 3), thinking and answering at full and thinking at 0.5 / answering at full, for
tests/reasoning.rs to check that they stay the same (at every ISA level).

    python3 tools/reasoning/greedy.py MODEL tests/fixtures/reasoning/test.jsonl OUT.json [--bin PATH]

Standard library only.
"""

import argparse
import json
import os
import subprocess
import tempfile

MODES = {
    "full": [],
    "0.5->full": ["--think-budget", "0.5", "--answer-budget", "full"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("test")
    ap.add_argument("out")
    ap.add_argument("--bin", default="target/release/elastica")
    a = ap.parse_args()
    test = [json.loads(l) for l in open(a.test)]
    picked, seen = [], set()
    for r in test:
        if r["level"] == 3 and r["family"] not in seen:
            seen.add(r["family"])
            picked.append({"id": r["id"], "prompt": r["prompt"]})
    with tempfile.TemporaryDirectory() as d:
        prompts = os.path.join(d, "prompts.jsonl")
        with open(prompts, "w") as f:
            for p in picked:
                f.write(json.dumps(p) + "\n")
        out = {"problems": picked}
        for mode, extra in MODES.items():
            r = subprocess.run([a.bin, "run", a.model, "--prompts", prompts, "--chat", "-n", "320"]
                               + extra, check=True, capture_output=True, text=True)
            out[mode] = [json.loads(l)["text"] for l in r.stdout.splitlines()]
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
