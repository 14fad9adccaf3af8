"""Interoperability fixtures: slices written by `elastica slice` must load in HF transformers and
give the logits elastica gives. For each case this runs `elastica slice` on a fixture, loads the
slice with transformers (fp32, eager), and records its logits for the fixture's tokens in
tests/fixtures/slices/<case>.json. The Rust test slices again and compares.

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
    "nemotron_h_dense-mixed": ("nemotron_h_dense", "hidden=48,ffn=64,heads=2,mamba_heads=6,mamba_head_dim=8,skip=1"),
    "nemotron_h_moe-mixed": ("nemotron_h_moe", "hidden=32,experts=6,moe_ffn=16,shared_ffn=16,mamba_heads=6,heads=2,skip=4"),
    "llama_tiny-mixed": ("llama_tiny", "hidden=48,ffn=64,heads=2,skip=0"),
}
torch.set_num_threads(2)
out_dir = root / "tests/fixtures/slices"
out_dir.mkdir(parents=True, exist_ok=True)
for case, (fixture, spec) in CASES.items():
    src = root / "tests/fixtures" / fixture
    ref = json.loads((src / "reference.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        dst = pathlib.Path(tmp) / "slice"
        subprocess.run([exe, "slice", str(src), "--budget", spec, "--out", str(dst)], check=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        with torch.no_grad():
            logits = model(torch.tensor([ref["tokens"]])).logits[0]
        ours = subprocess.run([exe, "logits", str(dst), "--tokens", ",".join(map(str, ref["tokens"])), "--json"], check=True, capture_output=True).stdout
        ours = torch.tensor(json.loads(ours)["logits"])
    d = (ours - logits).abs().max().item() / logits.abs().max().item()
    print(f"{case}: transformers loads the slice; elastica vs transformers {d:.2e}")
    assert d < 1e-4, d
    (out_dir / f"{case}.json").write_text(json.dumps({
        "fixture": fixture, "budget": spec, "tokens": ref["tokens"],
        "logits": [[float(f"{v:.8g}") for v in row] for row in logits.tolist()],
        "transformers": transformers.__version__, "torch": torch.__version__,
    }))
