#!/usr/bin/env python3
"""Checks a folder written by problems.py (and tokenizer.py).

    python3 tools/reasoning/check.py DIR

Standard library checks: train.txt is exactly the chat rendering of train.jsonl (and each
document is the generation prompt plus the completion), test prompts are distinct and none
is a training prompt, every answer is right (recomputed from the prompt) and every equation
line of a trace holds. When the optional packages are installed, also: `tokenizers` loads
DIR/tokenizer.json, each special token is one id, no character maps to <unk> and
decode(encode(doc)) == doc for every document; `jinja2` (with HF's trim_blocks/lstrip_blocks
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


def check_trace(rec):
    lines = rec["think"].split("\n")
    if rec["family"] == "sort":
        xs = [int(x) for x in rec["prompt"].split()[1:]]
        for line in lines:
            m, rest = line.split("|")
            assert int(m) == min(xs), line
            xs.remove(int(m))
            assert [int(x) for x in rest.split(" ")] == xs, line
        return
    for line in lines:
        assert EQUATION.match(line), line
        lhs, rhs = line.split("=")
        assert eval(lhs) == eval(rhs), line
        if rec["family"] == "mod" and "*" in rhs and rhs.count("+") == 1:
            q, mr = rhs.split("*")
            m, r = mr.split("+")
            assert 0 <= int(r) < int(m) and len(q) == 1, line


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
    for r in test + train:
        assert r["answer"] == expected_answer(r), r
        check_trace(r)
    report["records"] = {"train": len(train), "test": len(test)}
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
