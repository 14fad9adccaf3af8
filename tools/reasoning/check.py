#!/usr/bin/env python3
"""Checks a folder written by problems.py (and tokenizer.py).

    python3 tools/reasoning/check.py DIR

Standard library checks: train.txt is exactly the chat rendering of train.jsonl (and each
document is the generation prompt plus the completion), test prompts are distinct and none
is a training prompt, every answer is right (recomputed from the prompt) and every line of a
trace holds, in either trace style (told apart per record: digits traces of add, mul and mod
have `A op B: ...` lines, compact ones only equations). Compact: every equation holds, the
lines are the ones the prompt calls for (operands from the prompt and earlier results, the
long division's chunks) and the last result is the answer. Digits: every one-digit step (its
digits taken from the operands in order, its carry or borrow from the step before, its
arithmetic), every assembly `-> R` (copied from the steps, equal to the operation), the chain
of lines (operands from the prompt and earlier results, the multiples table, the long
division: the largest multiple <= cur, the digits brought down) and the answer.

When the optional packages are installed, also: `tokenizers` loads DIR/tokenizer.json, each
special token is one id, no character maps to <unk> and decode(encode(doc)) == doc for every
document; `jinja2` (with HF's trim_blocks/lstrip_blocks
and without) and `minijinja` (strict undefined, no pycompat) render the template of
DIR/tokenizer_config.json exactly as chat.py does. Prints a JSON report; exits 1 on a failure.
"""

import json
import os
import re
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chat  # noqa: E402
import problems  # noqa: E402

EQUATION = re.compile(r"^[0-9+\-*]+=[0-9+\-*]+$")


def expected_answer(rec):
    p = rec["prompt"]
    if rec["family"] == "sort":
        return " ".join(map(str, sorted(int(x) for x in p.split()[1:])))
    assert re.fullmatch(r"[0-9+\-*%()]+=\?", p), p
    return str(eval(p[:-2]))  # digits and + - * % ( ) only


def trace_style(rec):
    """'digits' or 'compact' ('sort' traces are the same in both: 'compact')."""
    return "digits" if ":" in rec["think"] else "compact"


def check_trace(rec):
    lines = rec["think"].split("\n")
    if rec["family"] == "sort":
        xs = [int(x) for x in rec["prompt"].split()[1:]]
        for line in lines:
            m, rest = line.split("|")
            assert m == str(min(xs)), line
            xs.remove(int(m))
            assert rest == " ".join(map(str, xs)), line
        assert len(xs) == 1 and rec["answer"].split()[-1] == str(xs[0]), rec
        return
    if trace_style(rec) == "digits":
        check_digits(rec, lines)
        return
    for line in lines:
        assert EQUATION.match(line), line
        lhs, rhs = line.split("=")
        assert eval(lhs) == eval(rhs), line
        if rec["family"] == "mod" and "*" in rhs and rhs.count("+") == 1:
            q, mr = rhs.split("*")
            m, r = mr.split("+")
            assert 0 <= int(r) < int(m) and len(q) == 1, line
    assert lines == compact_trace(rec["prompt"], rec["family"]), (rec["prompt"], lines)
    last = lines[-1].split("=")[1]
    assert (last.split("+")[1] if rec["family"] == "mod" else last) == rec["answer"], rec


def compact_trace(prompt, family):
    """The compact trace the prompt calls for, rebuilt from the prompt alone (add: the running
    total; mul: a*(d*10^i) for every digit of b, then the running sum; mod: the products, the
    sum, then `cur=q*m+r` from the shortest prefix of the sum >= m, each next cur the remainder
    followed by the next digit)."""
    if family == "add":
        toks = re.findall(r"\d+|[-+]", prompt[:-2])
        total, out = int(toks[0]), []
        for op, x in zip(toks[1::2], toks[2::2]):
            new = total + int(x) if op == "+" else total - int(x)
            out.append(f"{total}{op}{x}={new}")
            total = new
        return out
    if family == "mul":
        a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=\?", prompt).groups())
        parts = [int(d) * 10**i * a for i, d in enumerate(reversed(str(b)))]
        out = [f"{a}*{p // a}={p}" for p in parts]
        s = parts[0]
        for p in parts[1:]:
            out.append(f"{s}+{p}={s + p}")
            s += p
        return out
    g = re.fullmatch(r"\((\d+)([*+])(\d+)(?:\+(\d+)(?:\*(\d+))?)?\)%(\d+)=\?", prompt)
    x1, o1, x2, x3, x4, sm = g.groups()
    m = int(sm)
    if o1 == "+":
        s, out = int(x1) + int(x2), [f"{x1}+{x2}={int(x1) + int(x2)}"]
    else:
        p = int(x1) * int(x2)
        out = [f"{x1}*{x2}={p}"]
        q = int(x3) if x4 is None else int(x3) * int(x4)
        if x4 is not None:
            out.append(f"{x3}*{x4}={q}")
        s = p + q
        out.append(f"{p}+{q}={s}")
    digs = str(s)
    k = next((k for k in range(1, len(digs) + 1) if int(digs[:k]) >= m), len(digs))
    cur = int(digs[:k])
    while True:
        out.append(f"{cur}={cur // m}*{m}+{cur % m}")
        if k == len(digs):
            return out
        cur = cur % m * 10 + int(digs[k])
        k += 1


# --- the digits style ---------------------------------------------------------------------
OP_LINE = re.compile(r"^(\d+)([-+*])(\d+): (\S+(?: \S+)*) -> (\d+)$")
ZERO_SUB = re.compile(r"^(\d+)-0=(\d+)$")
ADD_STEP = re.compile(r"^(\d)\+(\d)(\+1)?=(\d+)$")
SUB_STEP = re.compile(r"^(1?)(\d)-(\d)(-1)?=(\d)$")
MUL_STEP = re.compile(r"^(\d)\*(\d)=(\d+)(?:\+(\d)=(\d+))?$")
TABLE = re.compile(r"^%([1-9]\d*): (\d+(?: \d+)*)$")


def rdigits(x, n):
    return [(x // 10**i) % 10 for i in range(n)]


def canonical(s):
    return re.fullmatch(r"0|[1-9]\d*", s) is not None


def check_op_line(line):
    """Checks one `A op B: steps -> R` (or `A-0=A`) line; returns (A, op, B, R)."""
    z = ZERO_SUB.match(line)
    if z:
        assert canonical(z.group(1)) and z.group(1) == z.group(2), line
        return int(z.group(1)), "-", 0, int(z.group(2))
    g = OP_LINE.match(line)
    assert g, line
    sa, op, sb, steps, sr = g.groups()
    assert canonical(sa) and canonical(sb) and canonical(sr), line
    a, b, r = int(sa), int(sb), int(sr)
    steps = steps.split(" ")
    if op == "+":
        n = max(len(sa), len(sb))
        assert len(steps) == n, line
        vals, c = [], 0
        for st, x, y in zip(steps, rdigits(a, n), rdigits(b, n)):
            s = ADD_STEP.match(st)
            assert s, (line, st)
            assert (int(s.group(1)), int(s.group(2)), bool(s.group(3))) == (x, y, bool(c)), (line, st)
            v = int(s.group(4))
            assert v == x + y + c and s.group(4) == str(v), (line, st)
            vals.append(v)
            c = v // 10
        assembled = str(vals[-1]) + "".join(str(v % 10) for v in reversed(vals[:-1]))
        assert sr == assembled and r == a + b, line
    elif op == "-":
        assert 0 < b <= a, line
        n = len(sa)
        assert len(steps) == n, line
        digs, bor = [], 0
        for st, x, y in zip(steps, rdigits(a, n), rdigits(b, n)):
            s = SUB_STEP.match(st)
            assert s, (line, st)
            ten, sx, sy, pay, sz = s.groups()
            assert (int(sx), int(sy), bool(pay)) == (x, y, bool(bor)), (line, st)
            need = x - y - bor < 0
            assert bool(ten) == need, (line, st)  # borrow exactly when the column needs it
            v = 10 * need + x - y - bor
            assert int(sz) == v, (line, st)
            digs.append(sz)
            bor = int(need)
        assert bor == 0, line
        assembled = "".join(reversed(digs)).lstrip("0") or "0"
        assert sr == assembled and r == a - b, line
    else:
        assert re.fullmatch(r"[1-9]0*", sb), line  # B = d * 10^k
        d, k = int(sb[0]), len(sb) - 1
        assert len(steps) == len(sa), line
        vals, c = [], 0
        for st, x in zip(steps, rdigits(a, len(sa))):
            s = MUL_STEP.match(st)
            assert s, (line, st)
            sd, sx, sp, sc, sv = s.groups()
            assert (int(sd), int(sx)) == (d, x), (line, st)
            assert int(sp) == d * x and sp == str(d * x), (line, st)
            if c:
                assert sc is not None and int(sc) == c and sv == str(d * x + c), (line, st)
            else:
                assert sc is None, (line, st)
            v = d * x + c
            vals.append(v)
            c = v // 10
        assembled = str(vals[-1]) + "".join(str(v % 10) for v in reversed(vals[:-1]))
        assembled = (assembled.lstrip("0") or "0") + ("0" * k if a * d else "")
        assert sr == assembled and r == a * b, line
    return a, op, b, r


def check_mul_chain(lines, a, b):
    """Partial products a*(d*10^i) for the nonzero digits d of b from the units up, then the
    running sum of them; returns the result and the lines used."""
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(b))) if d != "0"]
    results = []
    for line, f in zip(lines, parts):
        x, op, y, r = check_op_line(line)
        assert (x, op, y) == (a, "*", f), line
        results.append(r)
    assert len(results) == len(parts), lines
    used, s = len(parts), results[0]
    for p in results[1:]:
        x, op, y, r = check_op_line(lines[used])
        assert (x, op, y) == (s, "+", p), lines[used]
        s, used = r, used + 1
    return s, used


def check_digits(rec, lines):
    fam, p, answer = rec["family"], rec["prompt"], rec["answer"]
    if fam == "add":
        toks = re.findall(r"\d+|[-+]", p[:-2])
        total = int(toks[0])
        assert len(lines) == (len(toks) - 1) // 2, (p, lines)
        for line, op, x in zip(lines, toks[1::2], toks[2::2]):
            a, o, b, r = check_op_line(line)
            assert (a, o, b) == (total, op, int(x)), (p, line)
            total = r
        assert str(total) == answer, (p, answer)
        return
    if fam == "mul":
        a, b = map(int, re.fullmatch(r"(\d+)\*(\d+)=\?", p).groups())
        s, used = check_mul_chain(lines, a, b)
        assert used == len(lines) and str(s) == answer, (p, lines)
        return
    assert fam == "mod", fam
    g = re.fullmatch(r"\((\d+)([*+])(\d+)(?:\+(\d+)(?:\*(\d+))?)?\)%(\d+)=\?", p)
    assert g, p
    x1, o1, x2, x3, x4, sm = g.groups()
    m, i = int(sm), 0
    if o1 == "+":  # (a+b)%m
        terms = [int(x1), int(x2)]
    else:  # (a*b+c)%m or (a*b+c*d)%m; b, d one digit
        t, used = check_mul_chain(lines, int(x1), int(x2))
        assert used == 1, lines
        terms, i = [t], 1
        if x4 is None:
            terms.append(int(x3))
        else:
            t, used = check_mul_chain(lines[i:], int(x3), int(x4))
            assert used == 1, lines
            terms.append(t)
            i += 1
    a, o, b, s = check_op_line(lines[i])
    assert (a, o, b) == (terms[0], "+", terms[1]), lines[i]
    i += 1
    t = TABLE.match(lines[i])
    assert t and int(t.group(1)) == m, lines[i]
    table = [int(v) for v in t.group(2).split(" ")]
    assert t.group(2) == " ".join(str(k * m) for k in range(1, 10)), lines[i]
    i += 1
    # Long division: the first cur is the shortest prefix of s that is >= m (s itself when
    # s < m); each line subtracts the largest table multiple <= cur (0 below m); the next cur
    # is the remainder followed by the next digit of s.
    digs = str(s)
    k = next((k for k in range(1, len(digs) + 1) if int(digs[:k]) >= m), len(digs))
    cur = int(digs[:k])
    assert len(lines) - i == len(digs) - k + 1, (p, lines)
    for line in lines[i:]:
        a, o, mult, r = check_op_line(line)
        assert o == "-" and a == cur, (p, line)
        assert mult == max([0] + [v for v in table if v <= cur]), (p, line)
        assert 0 <= r < m, (p, line)
        if k < len(digs):
            cur = r * 10 + int(digs[k])
        k += 1
    assert str(r) == answer and r == s % m, (p, answer)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    d = sys.argv[1]
    report = {}
    test = read_jsonl(os.path.join(d, "test.jsonl"))
    train = read_jsonl(os.path.join(d, "train.jsonl"))
    with open(os.path.join(d, "train.txt"), encoding="utf-8", newline="") as f:
        text = f.read()

    docs = [problems.document(r) for r in train]
    assert "".join(docs) == text, "train.txt is not the rendering of train.jsonl"
    for r, doc in zip(train, docs):
        think = r["think"][: r["cut"]] if r["mode"] == "truncated" else r["think"]
        assert doc == chat.prompt_text(r["prompt"], r["mode"] != "no_think") + chat.completion(
            think, r["answer"], r["mode"]
        )
        assert doc.endswith(chat.IM_END + "\n")
    test_prompts = [r["prompt"] for r in test]
    assert len(set(test_prompts)) == len(test_prompts), "duplicate test prompts"
    overlap = set(test_prompts) & {r["prompt"] for r in train}
    assert not overlap, f"test prompts in the training set: {sorted(overlap)[:5]}"
    styles = {}
    for r in test + train:
        assert r["answer"] == expected_answer(r), r
        check_trace(r)
        if r["family"] != "sort":
            styles[trace_style(r)] = styles.get(trace_style(r), 0) + 1
    report["records"] = {"train": len(train), "test": len(test)}
    report["traces"] = styles
    report["stdlib"] = "ok"

    tok_path = os.path.join(d, "tokenizer.json")
    cfg_path = os.path.join(d, "tokenizer_config.json")
    try:
        import tokenizers
    except ImportError:
        report["tokenizers"] = "skipped (not installed)"
    else:
        if not os.path.exists(tok_path):
            report["tokenizers"] = "skipped (no tokenizer.json)"
        else:
            tok = tokenizers.Tokenizer.from_file(tok_path)
            unk = tok.token_to_id("<unk>")
            for s in (chat.ENDOFTEXT, chat.IM_START, chat.IM_END, chat.THINK, chat.END_THINK):
                ids = tok.encode(s, add_special_tokens=False).ids
                assert len(ids) == 1 and tok.id_to_token(ids[0]) == s, (s, ids)
            n_tokens = []
            for doc in docs + [chat.prompt_text(r["prompt"]) for r in test]:
                ids = tok.encode(doc, add_special_tokens=False).ids
                assert unk not in ids, doc
                assert tok.decode(ids, skip_special_tokens=False) == doc, doc
                n_tokens.append(len(ids))
            nt = n_tokens[: len(docs)]
            report["tokenizers"] = {
                "version": tokenizers.__version__,
                "vocab_size": tok.get_vocab_size(),
                "doc_tokens_mean": round(sum(nt) / max(len(nt), 1), 1),
                "doc_tokens_max": max(nt, default=0),
                "round_trip": "ok",
            }

    template = chat.TEMPLATE
    if os.path.exists(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
        assert template == chat.TEMPLATE, "tokenizer_config.json has another chat template"
    cases = []
    for r in test[:50] + train[:200]:
        p = r["prompt"]
        user = [{"role": "user", "content": p}]
        for et in (None, True, False):
            kw = {} if et is None else {"enable_thinking": et}
            want = chat.prompt_text(p, et is not False)
            cases.append((user, True, kw, want))
        cases.append(
            (
                [{"role": "system", "content": "be exact"}] + user,
                True,
                {},
                chat.prompt_text(p, True, system="be exact"),
            )
        )
        if "mode" in r:
            content = chat.assistant_content(
                r["think"][: r["cut"]] if r["mode"] == "truncated" else r["think"],
                r["answer"],
                r["mode"],
            )
            conv = user + [{"role": "assistant", "content": content}]
            want = problems.document(r)
            cases.append((conv, False, {}, want))
            cases.append((conv, False, {"enable_thinking": False}, want))
            cases.append((conv + user, True, {}, want + chat.prompt_text(p)))

    def run(name, render):
        for msgs, agp, kw, want in cases:
            got = render(msgs, agp, kw)
            assert got == want, (name, got, want)
        report[name] = f"ok ({len(cases)} renderings)"

    try:
        import jinja2
    except ImportError:
        report["jinja2"] = "skipped (not installed)"
    else:
        for hf in (True, False):
            env = jinja2.Environment(trim_blocks=hf, lstrip_blocks=hf, undefined=jinja2.StrictUndefined)
            t = env.from_string(template)
            run(
                "jinja2" + ("_hf" if hf else ""),
                lambda m, a, kw: t.render(messages=m, add_generation_prompt=a, bos_token="", eos_token=chat.IM_END, **kw),
            )
    try:
        import minijinja
    except ImportError:
        report["minijinja"] = "skipped (not installed)"
    else:
        env = minijinja.Environment()
        env.pycompat = False
        env.undefined_behavior = "strict"
        run(
            "minijinja",
            lambda m, a, kw: env.render_str(
                template, messages=m, add_generation_prompt=a, bos_token="", eos_token=chat.IM_END, **kw
            ),
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
