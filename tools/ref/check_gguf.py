#!/usr/bin/env python3
"""Check a fixture's GGUF against its reference.json using llama.cpp, and dump the GGUF layout.

    .venv-ref/bin/python tools/ref/check_gguf.py tests/fixtures/nemotron_h_dense [more folders] [--dump]

Needs the llama.cpp build of scripts/build-llama-cpp.sh (static libs under .cache/llama.cpp/build).
Builds .cache/ref/lcpp_logits from tools/ref/lcpp_logits.cpp on first use (g++, links libllama.a),
runs it (a) as one batch over all tokens and (b) as prefill + one-token decode steps, and compares
the logits of every position with reference.json. Fails if max |diff| > --tol (default 1e-4).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def build_helper(lcpp: Path, out: Path) -> Path:
    src = REPO / "tools" / "ref" / "lcpp_logits.cpp"
    libs = [lcpp / "build/src/libllama.a", lcpp / "build/ggml/src/libggml.a",
            lcpp / "build/ggml/src/libggml-cpu.a", lcpp / "build/ggml/src/libggml-base.a"]
    for lib in libs:
        if not lib.is_file():
            sys.exit(f"check_gguf: {lib} missing (run scripts/build-llama-cpp.sh first)")
    if out.is_file() and out.stat().st_mtime > max(p.stat().st_mtime for p in [src, *libs]):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["g++", "-O2", "-std=c++17", f"-I{lcpp / 'include'}", f"-I{lcpp / 'ggml/include'}", str(src),
           "-o", str(out), *map(str, libs), "-fopenmp", "-lpthread", "-ldl"]
    print("+", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def run_helper(exe: Path, gguf_path: Path, tokens: list[int], prefill: int) -> np.ndarray:
    res = subprocess.run([str(exe), str(gguf_path), ",".join(map(str, tokens)), str(prefill)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if res.returncode != 0:
        sys.exit(f"lcpp_logits failed ({res.returncode}):\n{res.stderr}")
    rows = [list(map(float, line.split())) for line in res.stdout.strip().splitlines()]
    return np.asarray(rows, dtype=np.float64)


def dump_gguf(path: Path) -> None:
    sys.path.insert(0, str(REPO / ".cache" / "llama.cpp" / "gguf-py"))
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    r = GGUFReader(str(path))
    print(f"  metadata ({len(r.fields)} fields):")
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        t = f.types[0] if f.types else None
        if t == GGUFValueType.ARRAY:
            vals = f.contents()
            shown = vals if len(vals) <= 16 else f"[{len(vals)} x {GGUFValueType(f.types[1]).name}] {vals[:4]}..."
            print(f"    {name} = {shown}")
        else:
            print(f"    {name} = {f.contents()!r}")
    print(f"  tensors ({len(r.tensors)}), ggml shape order (ne0 first):")
    for t in r.tensors:
        print(f"    {t.name:28s} {t.tensor_type.name:4s} {[int(x) for x in t.shape]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--gguf", default="model-f32.gguf")
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMA_CPP_DIR", REPO / ".cache/llama.cpp")))
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--prefill", type=int, default=13)
    ap.add_argument("--dump", action="store_true", help="print GGUF metadata and tensor shapes")
    args = ap.parse_args()
    exe = build_helper(args.llama_cpp.resolve(), REPO / ".cache" / "ref" / "lcpp_logits")
    bad = False
    for folder in args.folders:
        ref = json.loads((folder / "reference.json").read_text())
        tokens = ref["tokens"]
        want = np.asarray(ref["logits"], dtype=np.float64)
        g = folder / args.gguf
        print(f"== {folder}  ({g.stat().st_size} B)")
        if args.dump:
            dump_gguf(g)
        for label, prefill in (("one batch", 0), (f"prefill {args.prefill} + 1-token steps", args.prefill)):
            got = run_helper(exe, g, tokens, prefill)
            assert got.shape == want.shape, (got.shape, want.shape)
            d = np.abs(got - want)
            top1 = (got.argmax(-1) == want.argmax(-1)).mean()
            top5 = np.mean([set(np.argsort(-a)[:5]) == set(np.argsort(-b)[:5]) for a, b in zip(got, want)])
            print(f"  llama.cpp {label:28s}: max|diff| {d.max():.3g} (max|logit| {np.abs(want).max():.3g}), "
                  f"mean {d.mean():.3g}, worst pos {int(d.max(-1).argmax())}, top-1 agree {top1:.0%}, "
                  f"top-5 set agree {top5:.0%}")
            if d.max() > args.tol:
                bad = True
    if bad:
        sys.exit(f"check_gguf: max |diff| above tolerance {args.tol}")


if __name__ == "__main__":
    main()
