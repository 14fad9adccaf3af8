#!/usr/bin/env python3
"""Scores a model's completions on the reasoning test set.

    python3 tools/reasoning/score.py --test DIR/test.jsonl --outputs OUT.jsonl

OUT.jsonl: one JSON object a line with "id" (a test id) and "text" (the completion after the
prompt, with or without the thinking, `</think>`, `<|im_end|>`). Prints one JSON object:
accuracy overall, per family, per level and per family/level; a test id with no output
counts as wrong ("missing"). Answers compare after collapsing whitespace. Standard library only.
"""

import argparse
import json
import sys

END_THINK = "</think>"
THINK = "<think>"
STOPS = ("<|im_end|>", "<|endoftext|>")


def extract_answer(text):
    """The answer in a completion: the text after the last `</think>` (if any), stripped, cut
    at `<|im_end|>` (or `<|endoftext|>`) and at the first newline. A completion that opened
    `<think>` and never closed it has no answer ("")."""
    i = text.rfind(END_THINK)
    if i >= 0:
        text = text[i + len(END_THINK) :]
    elif THINK in text:
        return ""
    for s in STOPS:
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    text = text.strip()
    return text.split("\n", 1)[0].strip()


def normalize(answer):
    return " ".join(answer.split())


def correct(text, answer):
    return normalize(extract_answer(text)) == normalize(answer)


def score(test, outputs):
    """test: records with id, family, level, answer; outputs: {id: text}."""

    def bucket():
        return {"n": 0, "correct": 0}

    total, fam, lev, cell = bucket(), {}, {}, {}
    missing = 0
    for r in test:
        text = outputs.get(r["id"])
        if text is None:
            missing += 1
        ok = text is not None and correct(text, r["answer"])
        for b in (
            total,
            fam.setdefault(r["family"], bucket()),
            lev.setdefault(str(r["level"]), bucket()),
            cell.setdefault(f"{r['family']}/{r['level']}", bucket()),
        ):
            b["n"] += 1
            b["correct"] += ok

    def acc(b):
        return {**b, "accuracy": round(b["correct"] / b["n"], 4) if b["n"] else 0.0}

    return {
        **acc(total),
        "missing": missing,
        "by_family": {k: acc(v) for k, v in sorted(fam.items())},
        "by_level": {k: acc(v) for k, v in sorted(lev.items())},
        "by_family_level": {k: acc(v) for k, v in sorted(cell.items())},
    }


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--test", required=True, help="test.jsonl of problems.py")
    ap.add_argument("--outputs", required=True, help="JSONL with id and text")
    a = ap.parse_args(argv)
    test = read_jsonl(a.test)
    ids = {r["id"] for r in test}
    outputs = {}
    unknown = 0
    for o in read_jsonl(a.outputs):
        if o["id"] in ids:
            outputs[o["id"]] = o["text"]
        else:
            unknown += 1
    res = score(test, outputs)
    if unknown:
        res["unknown_ids"] = unknown
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
