"""Interoperability fixtures: slices written by `elastica slice` must load in the tools users run
and give the logits elastica gives there. HF outputs are loaded with transformers (fp32, eager),
GGUF outputs with llama.cpp (`.cache/ref/lcpp_logits`, built by tools/ref/check_gguf.py; f32 KV
cache, flash attention off). Covers same-format slices and HF <-> GGUF conversion. Each case's
logits for the fixture's tokens go to tests/fixtures/slices/<case>.json; the Rust test slices again
and compares.

Usage: .venv-ref/bin/python tools/ref/check_slices.py [path/to/elastica]
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import torch
import transformers

root = pathlib.Path(__file__).resolve().parents[2]
exe = sys.argv[1] if len(sys.argv) > 1 else str(root / "target/release/elastica")
CASES = {
    # case: (source fixture, file inside it or "", budget, output format)
    "nemotron_h_dense-mixed": ("nemotron_h_dense", "", "hidden=48,ffn=64,heads=2,mamba_heads=6,mamba_head_dim=8,skip=1", "hf"),
    "nemotron_h_moe-mixed": ("nemotron_h_moe", "", "hidden=32,experts=6,moe_ffn=16,shared_ffn=16,mamba_heads=6,heads=2,skip=4", "hf"),
    "llama_tiny-mixed": ("llama_tiny", "", "hidden=48,ffn=64,heads=2,skip=0", "hf"),
    "nemotron_h_moe-gguf-to-hf": ("nemotron_h_moe", "model-f32.gguf", "hidden=48,experts=6,heads=2,skip=1", "hf"),
    "nemotron_h_moe-hf-to-gguf": ("nemotron_h_moe", "", "hidden=48,experts=6,moe_ffn=16,heads=2,skip=2", "gguf"),
    "nemotron_h_dense-hf-to-gguf": ("nemotron_h_dense", "", "hidden=48,ffn=64,mamba_heads=6,skip=3", "gguf"),
    "llama_tiny-hf-to-gguf": ("llama_tiny", "", "hidden=48,ffn=64,heads=2", "gguf"),
}
torch.set_num_threads(2)
out_dir = root / "tests/fixtures/slices"
out_dir.mkdir(parents=True, exist_ok=True)
lcpp = root / ".cache/ref/lcpp_logits"
for case, (fixture, file, spec, fmt) in CASES.items():
    src = root / "tests/fixtures" / fixture
    if file:
        src = src / file
    ref = json.loads((root / "tests/fixtures" / fixture / "reference.json").read_text())
    ids = ",".join(map(str, ref["tokens"]))
    with tempfile.TemporaryDirectory() as tmp:
        dst = pathlib.Path(tmp) / ("slice" if fmt == "hf" else "slice.gguf")
        subprocess.run([exe, "slice", str(src), "--budget", spec, "--out", str(dst), "--format", fmt], check=True)
        if fmt == "hf":
            engine = f"transformers {transformers.__version__}"
            model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager")
            model.eval()
            with torch.no_grad():
                logits = model(torch.tensor([ref["tokens"]])).logits[0]
        else:
            engine = "llama.cpp (llama-cpp-python 0.3.36 sdist)"
            out = subprocess.run([str(lcpp), str(dst), ids], check=True, capture_output=True, text=True).stdout
            logits = torch.tensor([[float(x) for x in line.split()] for line in out.splitlines() if line.strip()])
        ours = subprocess.run([exe, "logits", str(dst), "--tokens", ids, "--json"], check=True, capture_output=True).stdout
        ours = torch.tensor(json.loads(ours)["logits"])
    d = (ours - logits).abs().max().item() / logits.abs().max().item()
    print(f"{case}: {engine} loads the slice; elastica vs it {d:.2e}")
    assert d < 1e-4, d
    (out_dir / f"{case}.json").write_text(json.dumps({
        "fixture": fixture, "file": file, "budget": spec, "format": fmt, "engine": engine, "tokens": ref["tokens"],
        "logits": [[float(f"{v:.8g}") for v in row] for row in logits.tolist()],
    }))
