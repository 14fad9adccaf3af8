#!/usr/bin/env python3
"""Seeded generator of exact-answer problems with short chains of thought, for a tiny
character-level reasoning model.

    python3 tools/reasoning/problems.py --out DIR [--train N] [--test 600] [--seed 0]
        [--test-seed S] [--no-think 0.2] [--truncate 0.1]

writes DIR/test.jsonl, DIR/train.jsonl and DIR/train.txt (each atomically) and prints a
one-line JSON summary. Families (levels 1..4, graded by size):

  add   chains of + and - over 2-3 digit numbers, level+1 terms; a running total per line
  mul   2x1, 2x2, 3x2, 3x3 digits; a partial product per digit of the second factor, then sums
  mod   (a+b)%m .. (a*b+c*d)%m; the products and sum, then long division of the sum by m,
        one line per digit (each line `cur=q*m+r`, q a single digit)
  sort  3-4, 5-6, 7, 8 two-digit numbers; per line the minimum taken, `|`, the rest

Every line of a trace is computable from the line before it and the prompt. Deterministic
for a given seed (random.Random only). Standard library only.
"""

import argparse
import json
import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import random  # noqa: E402

import chat  # noqa: E402

FAMILIES = ("add", "mul", "mod", "sort")
LEVELS = (1, 2, 3, 4)
CELLS = tuple((f, lv) for f in FAMILIES for lv in LEVELS)

# Every character a prompt, trace or answer can contain (tokenizer.py checks its vocabulary
# covers these and the template's text).
ALPHABET = "0123456789+-*%=?()| \nsort"

DEFAULT_TRAIN = 91200  # 5700 per family x level; about 12 M characters of train.txt


def _num(rng, digits):
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def gen_add(rng, level):
    """level+1 terms of 2-3 digits; a term larger than the running total is added."""
    total = _num(rng, rng.choice((2, 3)))
    expr, lines = str(total), []
    for _ in range(level):
        x = _num(rng, rng.choice((2, 3)))
        op = rng.choice("+-") if x <= total else "+"
        new = total + x if op == "+" else total - x
        lines.append(f"{total}{op}{x}={new}")
        expr += f"{op}{x}"
        total = new
    return f"{expr}=?", "\n".join(lines), str(total)


MUL_DIGITS = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3)}


def gen_mul(rng, level):
    """Partial products a*(d*10^i) for each digit d of b from the units up, then their sum."""
    da, db = MUL_DIGITS[level]
    a = _num(rng, da)
    b = rng.randint(2, 9) if db == 1 else _num(rng, db)
    lines, parts = [], []
    for i, d in enumerate(reversed(str(b))):
        f = int(d) * 10**i
        parts.append(a * f)
        lines.append(f"{a}*{f}={a * f}")
    s = parts[0]
    for p in parts[1:]:
        lines.append(f"{s}+{p}={s + p}")
        s += p
    assert s == a * b
    return f"{a}*{b}=?", "\n".join(lines), str(s)


def long_division(s, m):
    """Lines `cur=q*m+r` of the long division of s by m (q one digit each) and the remainder."""
    if s < m:
        return [f"{s}=0*{m}+{s}"], s
    digs = str(s)
    k = 1
    while int(digs[:k]) < m:
        k += 1
    cur, lines = int(digs[:k]), []
    while True:
        q, r = divmod(cur, m)
        assert q < 10
        lines.append(f"{cur}={q}*{m}+{r}")
        if k == len(digs):
            return lines, r
        cur = r * 10 + int(digs[k])
        k += 1


def gen_mod(rng, level):
    if level == 1:  # (a+b)%m, m one digit
        a, b, m = _num(rng, 2), _num(rng, 2), rng.randint(3, 9)
        expr, lines, s = f"({a}+{b})%{m}", [f"{a}+{b}={a + b}"], a + b
    elif level == 2:  # (a*b+c)%m
        a, b, c, m = _num(rng, 2), rng.randint(2, 9), _num(rng, 2), rng.randint(3, 19)
        p = a * b
        expr, lines, s = f"({a}*{b}+{c})%{m}", [f"{a}*{b}={p}", f"{p}+{c}={p + c}"], p + c
    else:  # (a*b+c*d)%m: level 3 with 2-digit a, c; level 4 with 3-digit a, c
        da, mmax = (2, 49) if level == 3 else (3, 99)
        a, b, c, d = _num(rng, da), rng.randint(2, 9), _num(rng, da), rng.randint(2, 9)
        m = rng.randint(11, mmax)
        p, q = a * b, c * d
        expr = f"({a}*{b}+{c}*{d})%{m}"
        lines, s = [f"{a}*{b}={p}", f"{c}*{d}={q}", f"{p}+{q}={p + q}"], p + q
    div, r = long_division(s, m)
    assert r == s % m
    return f"{expr}=?", "\n".join(lines + div), str(r)


SORT_LENGTHS = {1: (3, 4), 2: (5, 6), 3: (7,), 4: (8,)}


def gen_sort(rng, level):
    """Repeatedly take the minimum: each line is `min|rest` (rest in the order of the list)."""
    xs = [rng.randint(10, 99) for _ in range(rng.choice(SORT_LENGTHS[level]))]
    rest, lines = list(xs), []
    while len(rest) > 1:
        m = min(rest)
        rest.remove(m)
        lines.append(f"{m}|{' '.join(map(str, rest))}")
    return (
        f"sort {' '.join(map(str, xs))}",
        "\n".join(lines),
        " ".join(map(str, sorted(xs))),
    )


GENERATORS = {"add": gen_add, "mul": gen_mul, "mod": gen_mod, "sort": gen_sort}


def generate(rng, family, level):
    """(prompt, think, answer) of one problem."""
    return GENERATORS[family](rng, level)


def make_test(n, seed):
    """n distinct problems, cell i % 16 for the i-th (balanced over family x level)."""
    rng = random.Random(f"elastica-reasoning-test-{seed}")
    seen, out = set(), []
    for i in range(n):
        family, level = CELLS[i % len(CELLS)]
        for _ in range(10000):
            prompt, think, answer = generate(rng, family, level)
            if prompt not in seen:
                break
        else:
            raise SystemExit(f"cannot draw a new {family} level {level} test problem")
        seen.add(prompt)
        out.append(
            {
                "id": f"test-{i:04d}",
                "family": family,
                "level": level,
                "prompt": prompt,
                "think": think,
                "answer": answer,
            }
        )
    return out


def make_train(n, seed, test_prompts, no_think, truncate):
    """n problems (none with a test prompt), round robin over the cells, then shuffled.

    mode: 'no_think' with probability no_think, 'truncated' with probability truncate (the
    trace cut after `cut` characters, 1 <= cut < len(think), a newline at the cut dropped),
    else 'think'. `think` is always the full trace.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        family, level = CELLS[i % len(CELLS)]
        for _ in range(10000):
            prompt, think, answer = generate(rng, family, level)
            if prompt not in test_prompts:
                break
        else:
            raise SystemExit(f"cannot draw a {family} level {level} problem outside the test set")
        rec = {
            "id": "",
            "family": family,
            "level": level,
            "prompt": prompt,
            "think": think,
            "answer": answer,
        }
        u = rng.random()
        if u < no_think:
            rec["mode"] = "no_think"
        elif u < no_think + truncate and len(think) > 1:
            rec["mode"] = "truncated"
            rec["cut"] = len(think[: rng.randint(1, len(think) - 1)].rstrip("\n"))
        else:
            rec["mode"] = "think"
        out.append(rec)
    rng.shuffle(out)
    for i, rec in enumerate(out):
        rec["id"] = f"train-{i:06d}"
    return out


def document(rec):
    """The training document of a train.jsonl record, as the chat template renders it."""
    mode = rec["mode"]
    think = rec["think"][: rec["cut"]] if mode == "truncated" else rec["think"]
    return chat.render(rec["prompt"], think, rec["answer"], mode)


def write_atomic(path, text):
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="training problems")
    ap.add_argument("--test", type=int, default=600, help="test problems")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--test-seed", type=int, default=None, help="seed of the test set (default: --seed)"
    )
    ap.add_argument("--no-think", type=float, default=0.2, help="fraction rendered without thinking")
    ap.add_argument("--truncate", type=float, default=0.1, help="fraction with a cut trace")
    a = ap.parse_args(argv)
    if a.train < 0 or a.test < 0:
        ap.error("--train and --test must be >= 0")
    if not (0 <= a.no_think and 0 <= a.truncate and a.no_think + a.truncate <= 1):
        ap.error("--no-think and --truncate must be >= 0 and add up to at most 1")
    test_seed = a.seed if a.test_seed is None else a.test_seed

    test = make_test(a.test, test_seed)
    train = make_train(a.train, a.seed, {r["prompt"] for r in test}, a.no_think, a.truncate)
    docs = [document(r) for r in train]

    os.makedirs(a.out, exist_ok=True)
    write_atomic(os.path.join(a.out, "test.jsonl"), jsonl(test))
    write_atomic(os.path.join(a.out, "train.jsonl"), jsonl(train))
    write_atomic(os.path.join(a.out, "train.txt"), "".join(docs))

    def counts(records):
        c = {f: {str(lv): 0 for lv in LEVELS} for f in FAMILIES}
        for r in records:
            c[r["family"]][str(r["level"])] += 1
        return c

    lens = [len(d) for d in docs]
    modes = {m: 0 for m in chat.MODES}
    for r in train:
        modes[r["mode"]] += 1
    summary = {
        "out": a.out,
        "seed": a.seed,
        "test_seed": test_seed,
        "train": len(train),
        "test": len(test),
        "train_counts": counts(train),
        "test_counts": counts(test),
        "modes": modes,
        "train_chars": sum(lens),
        "doc_mean": round(sum(lens) / len(lens), 1) if lens else 0,
        "doc_max": max(lens, default=0),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
