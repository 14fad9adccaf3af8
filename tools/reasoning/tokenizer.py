#!/usr/bin/env python3
"""Writes the character-level tokenizer of the tiny reasoning model (HF `tokenizers` format).

    python3 tools/reasoning/tokenizer.py --out DIR

DIR/tokenizer.json: a WordLevel model over single characters, a Split pre-tokenizer that
isolates every character (newline included: the pattern is `[\\s\\S]`, valid for both the
Rust crate's fancy-regex and the Python package's Oniguruma), no normalizer, no
post-processor, the Fuse decoder (tokens joined as they are), so decode(encode(text)) == text
for any text made of the vocabulary's characters.

Ids: 0 <|endoftext|> (pad), 1 <|im_start|>, 2 <|im_end|> (eos), 3 <think>, 4 </think>,
5 <unk>, then tab, newline and printable ASCII (space to ~), then <|unused_N|> up to a
multiple of 64 entries. There is no BOS (ChatML documents open with <|im_start|>).
<think> / </think> are added tokens that are not "special" (as in Qwen3): they survive
decode(skip_special_tokens=True), so an answer can still be found after </think>.

DIR/tokenizer_config.json carries the chat template (chat.TEMPLATE), the special tokens and
added_tokens_decoder. Standard library only.
"""

import argparse
import json
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import chat  # noqa: E402
import problems  # noqa: E402

# (content, special)
ADDED = [
    (chat.ENDOFTEXT, True),
    (chat.IM_START, True),
    (chat.IM_END, True),
    (chat.THINK, False),
    (chat.END_THINK, False),
    ("<unk>", True),
]
CHARS = ["\t", "\n"] + [chr(c) for c in range(32, 127)]
MULTIPLE = 64
MODEL_MAX_LENGTH = 512


def vocabulary():
    """[(token, special or None for plain characters)] in id order."""
    toks = [(t, s) for t, s in ADDED] + [(c, None) for c in CHARS]
    n = -(-len(toks) // MULTIPLE) * MULTIPLE
    toks += [(f"<|unused_{i}|>", True) for i in range(n - len(toks))]
    return toks


def added_token(i, content, special):
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def tokenizer_json(toks):
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            added_token(i, t, s) for i, (t, s) in enumerate(toks) if s is not None
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"Regex": "[\\s\\S]"},
            "behavior": "Isolated",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "WordLevel",
            "vocab": {t: i for i, (t, _) in enumerate(toks)},
            "unk_token": "<unk>",
        },
    }


def tokenizer_config(toks):
    dec = {}
    for i, (t, s) in enumerate(toks):
        if s is not None:
            d = added_token(i, t, s)
            del d["id"]
            dec[str(i)] = d
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": dec,
        "bos_token": None,
        "eos_token": chat.IM_END,
        "pad_token": chat.ENDOFTEXT,
        "unk_token": "<unk>",
        "chat_template": chat.TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    a = ap.parse_args(argv)
    toks = vocabulary()
    names = [t for t, _ in toks]
    assert len(set(names)) == len(names)
    # Every character of the problems and of the template's own text is a token.
    template_text = chat.render_messages(
        [{"role": r, "content": ""} for r in ("system", "user", "assistant")], True
    )
    for text in (problems.ALPHABET, template_text):
        for s in (chat.IM_START, chat.IM_END, chat.THINK, chat.END_THINK):
            text = text.replace(s, "")
        missing = {c for c in text if c not in CHARS}
        assert not missing, f"characters without a token: {sorted(missing)}"
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "tokenizer.json"), tokenizer_json(toks))
    write_json(os.path.join(a.out, "tokenizer_config.json"), tokenizer_config(toks))
    print(
        json.dumps(
            {
                "out": a.out,
                "vocab_size": len(toks),
                "specials": {t: i for i, (t, s) in enumerate(toks) if s is not None and i < 6},
                "characters": len(CHARS),
                "unused": sum(t.startswith("<|unused_") for t in names),
            }
        )
    )


if __name__ == "__main__":
    main()
