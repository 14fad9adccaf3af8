#!/usr/bin/env python3
"""Seeded generator of exact-answer problems with short chains of thought, for a tiny
character-level reasoning model.

    python3 tools/reasoning/problems.py --out DIR [--train N] [--test 600] [--seed 0]
        [--test-seed S] [--no-think 0.2] [--truncate 0.1] [--trace digits|compact]

writes DIR/test.jsonl, DIR/train.jsonl and DIR/train.txt (each atomically) and prints a
one-line JSON summary. Families (levels 1..4, graded by size):

  add   chains of + and - over 2-3 digit numbers, level+1 terms; one line per operation
  mul   2x1, 2x2, 3x2, 3x3 digits; a partial product per digit of the second factor, then sums
  mod   (a+b)%m .. (a*b+c*d)%m; the products and sum, then long division of the sum by m,
        one line per digit brought down (a one-digit quotient each)
  sort  3-4, 5-6, 7, 8 two-digit numbers; per line the minimum taken, `|`, the rest

Two trace styles, the same problems (prompts, answers, modes) for a seed:

  digits   (default) every multi-digit operation is one line `A op B: STEP ... -> R` of
           one-digit steps from the units up, `x+y[+1]=z` (carry in), `[1]x-y[-1]=z`
           (borrow: a leading 1 takes ten from the next column, -1 pays it), `d*x=p[+c=v]`
           (carry added), and R copied from them (the last step's value, then the last digit
           of each earlier step, right to left); mod writes the multiples of m once
           (`%m: m 2m .. 9m`), then per digit `cur-K: ... -> r`, K the largest multiple <= cur
  compact  one equation per operation: `356+620=976`, `561*60=33660`, `136=9*15+1`

Every line of a trace is computable from the lines before it and the prompt. Deterministic
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
TRACES = ("digits", "compact")
DEFAULT_TRACE = "digits"

# Every character a prompt, trace or answer can contain (tokenizer.py checks its vocabulary
# covers these and the template's text).
ALPHABET = "0123456789+-*%=?()| \nsort:>"

DEFAULT_TRAIN = 91200  # 5700 per family x level


def _num(rng, digits):
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


# --- digit-level steps (trace "digits") --------------------------------------------------
# A multi-digit operation is one line `A op B: STEP STEP ... -> R`, one step per digit of the
# operands from the units up, each a one-digit fact (plus a carry or borrow), and R assembled
# from the steps by copying: the last step's value, then the last digit of each earlier step
# from the right to the left (then the zeros of B for a shifted product); for `-` leading
# zeros are dropped.


def _rdigits(x, n):
    """The n lowest digits of x, units first (zeros above its length)."""
    return [(x // 10**i) % 10 for i in range(n)]


def digits_add(a, b):
    """`a+b: x+y[+1]=z ...`: per column the digits and the carry in, z = their sum (0..19)."""
    n = max(len(str(a)), len(str(b)))
    steps, c = [], 0
    for x, y in zip(_rdigits(a, n), _rdigits(b, n)):
        z = x + y + c
        steps.append(f"{x}+{y}{'+1' if c else ''}={z}")
        c = z // 10
    return f"{a}+{b}: {' '.join(steps)} -> {a + b}"


def digits_sub(a, b):
    """`a-b: [1]x-y[-1]=z ...` (a >= b): the column digits, a leading 1 when the column borrows
    ten from the next, `-1` when it pays the borrow of the column before; z is one digit."""
    assert 0 <= b <= a
    if b == 0:
        return f"{a}-0={a}"
    n = len(str(a))
    steps, bor = [], 0
    for x, y in zip(_rdigits(a, n), _rdigits(b, n)):
        z = x - y - bor
        pay = "-1" if bor else ""
        bor = int(z < 0)
        steps.append(f"{'1' if bor else ''}{x}-{y}{pay}={z + 10 * bor}")
    assert bor == 0
    return f"{a}-{b}: {' '.join(steps)} -> {a - b}"


def digits_mul(a, d, k=0):
    """`a*B: d*x=p[+c=v] ...` with B = d*10^k (d one digit): per digit x of a, the product and
    the carry (the tens of the step before) added; R is a*d then k zeros."""
    assert 1 <= d <= 9
    steps, c = [], 0
    for x in _rdigits(a, len(str(a))):
        p = d * x
        steps.append(f"{d}*{x}={p}" + (f"+{c}={p + c}" if c else ""))
        c = (p + c) // 10
    return f"{a}*{d * 10**k}: {' '.join(steps)} -> {a * d * 10**k}"


def digits_table(m):
    """`%m: m 2m .. 9m`: the multiples of the divisor (each the one before plus m)."""
    return f"%{m}: " + " ".join(str(k * m) for k in range(1, 10))


def digits_mod(s, m):
    """The table of m, then the long division of s by m: per digit brought down, `cur-K: ...`
    with K the largest multiple of m <= cur (from the table; `cur-0=cur` below m); the next
    cur is the remainder followed by the next digit of s. Returns (lines, remainder)."""
    lines, (chunks, r) = [digits_table(m)], _division(s, m)
    for cur, _q, _r in chunks:
        lines.append(digits_sub(cur, cur // m * m))
    return lines, r


def _division(s, m):
    """[(cur, q, r)] of the long division of s by m (q one digit each), and the remainder."""
    if s < m:
        return [(s, 0, s)], s
    digs = str(s)
    k = 1
    while int(digs[:k]) < m:
        k += 1
    cur, out = int(digs[:k]), []
    while True:
        q, r = divmod(cur, m)
        assert q < 10
        out.append((cur, q, r))
        if k == len(digs):
            return out, r
        cur = r * 10 + int(digs[k])
        k += 1


def long_division(s, m):
    """Lines `cur=q*m+r` of the long division of s by m (q one digit each) and the remainder."""
    chunks, r = _division(s, m)
    return [f"{cur}={q}*{m}+{rr}" for cur, q, rr in chunks], r


# --- generators: the random draws, then both renderings of the trace -----------------------
# Each returns (prompt, {"compact": think, "digits": think}, answer); the draws do not depend
# on the trace, so a seed gives the same prompts and answers in either style.


def gen_add(rng, level):
    """level+1 terms of 2-3 digits; a term larger than the running total is added."""
    total = _num(rng, rng.choice((2, 3)))
    expr, compact, digits = str(total), [], []
    for _ in range(level):
        x = _num(rng, rng.choice((2, 3)))
        op = rng.choice("+-") if x <= total else "+"
        new = total + x if op == "+" else total - x
        compact.append(f"{total}{op}{x}={new}")
        digits.append(digits_add(total, x) if op == "+" else digits_sub(total, x))
        expr += f"{op}{x}"
        total = new
    return f"{expr}=?", _traces(compact, digits), str(total)


MUL_DIGITS = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3)}


def gen_mul(rng, level):
    """Partial products a*(d*10^i) for each digit d of b from the units up, then their sum
    (compact: one line each; digits: each digit by digit, a digit 0 of b skipped)."""
    da, db = MUL_DIGITS[level]
    a = _num(rng, da)
    b = rng.randint(2, 9) if db == 1 else _num(rng, db)
    compact, parts = [], []
    digits, dparts = [], []
    for i, d in enumerate(reversed(str(b))):
        f = int(d) * 10**i
        parts.append(a * f)
        compact.append(f"{a}*{f}={a * f}")
        if d != "0":
            dparts.append(a * f)
            digits.append(digits_mul(a, int(d), i))
    s = parts[0]
    for p in parts[1:]:
        compact.append(f"{s}+{p}={s + p}")
        s += p
    t = dparts[0]
    for p in dparts[1:]:
        digits.append(digits_add(t, p))
        t += p
    assert s == t == a * b
    return f"{a}*{b}=?", _traces(compact, digits), str(s)


def gen_mod(rng, level):
    if level == 1:  # (a+b)%m, m one digit
        a, b, m = _num(rng, 2), _num(rng, 2), rng.randint(3, 9)
        expr, s = f"({a}+{b})%{m}", a + b
        compact, digits = [f"{a}+{b}={s}"], [digits_add(a, b)]
    elif level == 2:  # (a*b+c)%m
        a, b, c, m = _num(rng, 2), rng.randint(2, 9), _num(rng, 2), rng.randint(3, 19)
        p = a * b
        expr, s = f"({a}*{b}+{c})%{m}", p + c
        compact = [f"{a}*{b}={p}", f"{p}+{c}={s}"]
        digits = [digits_mul(a, b), digits_add(p, c)]
    else:  # (a*b+c*d)%m: level 3 with 2-digit a, c; level 4 with 3-digit a, c
        da, mmax = (2, 49) if level == 3 else (3, 99)
        a, b, c, d = _num(rng, da), rng.randint(2, 9), _num(rng, da), rng.randint(2, 9)
        m = rng.randint(11, mmax)
        p, q = a * b, c * d
        expr, s = f"({a}*{b}+{c}*{d})%{m}", p + q
        compact = [f"{a}*{b}={p}", f"{c}*{d}={q}", f"{p}+{q}={s}"]
        digits = [digits_mul(a, b), digits_mul(c, d), digits_add(p, q)]
    div, r = long_division(s, m)
    ddiv, dr = digits_mod(s, m)
    assert r == dr == s % m
    return f"{expr}=?", _traces(compact + div, digits + ddiv), str(r)


SORT_LENGTHS = {1: (3, 4), 2: (5, 6), 3: (7,), 4: (8,)}


def gen_sort(rng, level):
    """Repeatedly take the minimum: each line is `min|rest` (rest in the order of the list);
    the same in both styles."""
    xs = [rng.randint(10, 99) for _ in range(rng.choice(SORT_LENGTHS[level]))]
    rest, lines = list(xs), []
    while len(rest) > 1:
        m = min(rest)
        rest.remove(m)
        lines.append(f"{m}|{' '.join(map(str, rest))}")
    return (
        f"sort {' '.join(map(str, xs))}",
        _traces(lines, lines),
        " ".join(map(str, sorted(xs))),
    )


def _traces(compact, digits):
    return {"compact": "\n".join(compact), "digits": "\n".join(digits)}


GENERATORS = {"add": gen_add, "mul": gen_mul, "mod": gen_mod, "sort": gen_sort}


def generate_traces(rng, family, level):
    """(prompt, {trace style: think}, answer) of one problem."""
    return GENERATORS[family](rng, level)


def generate(rng, family, level, trace=DEFAULT_TRACE):
    """(prompt, think, answer) of one problem, the think in the given trace style."""
    prompt, thinks, answer = generate_traces(rng, family, level)
    return prompt, thinks[trace], answer


def make_test(n, seed, trace=DEFAULT_TRACE):
    """n distinct problems, cell i % 16 for the i-th (balanced over family x level)."""
    rng = random.Random(f"elastica-reasoning-test-{seed}")
    seen, out = set(), []
    for i in range(n):
        family, level = CELLS[i % len(CELLS)]
        for _ in range(10000):
            prompt, think, answer = generate(rng, family, level, trace)
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


def make_train(n, seed, test_prompts, no_think, truncate, trace=DEFAULT_TRACE):
    """n problems (none with a test prompt), round robin over the cells, then shuffled.

    mode: 'no_think' with probability no_think, 'truncated' with probability truncate (the
    trace cut after `cut` characters, 1 <= cut < len(think), a newline at the cut dropped),
    else 'think'. `think` is always the full trace.

    The main stream of draws is the same for every trace style (the compact cut is drawn even
    when another style is written), so a seed gives the same problems, modes and order in
    either style; the cut of a non-compact trace comes from a stream of its own.
    """
    rng = random.Random(seed)
    cut_rng = random.Random(f"elastica-reasoning-cut-{trace}-{seed}")
    out = []
    for i in range(n):
        family, level = CELLS[i % len(CELLS)]
        for _ in range(10000):
            prompt, thinks, answer = generate_traces(rng, family, level)
            if prompt not in test_prompts:
                break
        else:
            raise SystemExit(f"cannot draw a {family} level {level} problem outside the test set")
        think, compact = thinks[trace], thinks["compact"]
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
        elif u < no_think + truncate and len(compact) > 1 and len(think) > 1:
            rec["mode"] = "truncated"
            k = rng.randint(1, len(compact) - 1)
            if trace != "compact":
                k = cut_rng.randint(1, len(think) - 1)
            rec["cut"] = len(think[:k].rstrip("\n"))
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


def think_doc_chars(records):
    """{family: {level: [mean, max]}}: characters of the whole-trace (mode 'think') document of
    each record, whatever its mode (one character is one token but for the six tags)."""
    cells = {}
    for r in records:
        n = len(chat.render(r["prompt"], r["think"], r["answer"], "think"))
        cells.setdefault((r["family"], r["level"]), []).append(n)
    out = {f: {} for f in FAMILIES}
    for (f, lv), ns in sorted(cells.items()):
        out[f][str(lv)] = [round(sum(ns) / len(ns), 1), max(ns)]
    return out


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
    ap.add_argument(
        "--trace",
        choices=TRACES,
        default=DEFAULT_TRACE,
        help="trace style: digits (one-digit steps, default) or compact (one line per operation)",
    )
    a = ap.parse_args(argv)
    if a.train < 0 or a.test < 0:
        ap.error("--train and --test must be >= 0")
    if not (0 <= a.no_think and 0 <= a.truncate and a.no_think + a.truncate <= 1):
        ap.error("--no-think and --truncate must be >= 0 and add up to at most 1")
    test_seed = a.seed if a.test_seed is None else a.test_seed

    test = make_test(a.test, test_seed, a.trace)
    train = make_train(
        a.train, a.seed, {r["prompt"] for r in test}, a.no_think, a.truncate, a.trace
    )
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
        "trace": a.trace,
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
        "think_doc_chars": think_doc_chars(train + test),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
