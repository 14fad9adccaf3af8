"""Turns the reST sources of the Python documentation (Debian package python3.11-doc) into plain
text splits for elastica: calibration (library reference), training (how-tos, language reference,
what's new) and a held-out evaluation split (tutorial and FAQ) that no ranking or training sees.

Usage: python3 tools/data/prepare_text.py SOURCES_DIR OUT_DIR
"""
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1])
out = pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)

SPLITS = {
    "calib": ["library"],
    "train": ["howto", "reference", "whatsnew", "extending", "using", "c-api", "install", "installing", "distributing"],
    "eval": ["tutorial", "faq"],
}

role = re.compile(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
literal = re.compile(r"``([^`]*)``")
link = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
plain = re.compile(r"`([^`]*)`_*")


def clean(text: str) -> str:
    lines = []
    skip_indent = None
    for line in text.splitlines():
        s = line.strip()
        if skip_indent is not None:
            if s and (len(line) - len(line.lstrip())) <= skip_indent:
                skip_indent = None
            else:
                continue
        if re.fullmatch(r"[=\-~^\"'*+#`.:]{3,}", s):
            continue  # section underlines
        if s.startswith(".. ") and "::" in s:
            d = s[3:s.index("::")].strip()
            if d in ("toctree", "index", "highlight", "sectionauthor", "moduleauthor", "module", "currentmodule", "testsetup", "testcleanup", "only", "include", "tabularcolumns", "raw", "image", "figure"):
                skip_indent = len(line) - len(line.lstrip())
                continue
            rest = s[s.index("::") + 2 :].strip()
            if rest:
                lines.append(rest)
            continue
        if s.startswith(".. ") or s.startswith(".. _") or (s.startswith(":") and s.count(":") >= 2 and s.split(":")[1].isidentifier() and len(s) < 60):
            continue
        line = role.sub(r"\1", line)
        line = literal.sub(r"\1", line)
        line = link.sub(r"\1", line)
        line = plain.sub(r"\1", line)
        lines.append(line.rstrip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


for split, dirs in SPLITS.items():
    docs = []
    for d in dirs:
        for f in sorted((src / d).rglob("*.rst.txt")):
            docs.append(clean(f.read_text(encoding="utf-8")))
    p = out / f"{split}.txt"
    p.write_text("\n\n".join(docs), encoding="utf-8")
    print(f"{p}: {p.stat().st_size} bytes from {len(docs)} documents")
