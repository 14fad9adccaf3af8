"""Reference quantization for the block formats elastify re-quantizes into (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
computed with gguf-py (llama.cpp's Python package, bit-exact with ggml's quantize_row_*_ref).
Writes tests/fixtures/quant_encode.json: rows of random f32 values (as little-endian hex, so they are exact)
and their quantized blocks.

Usage: .venv-ref/bin/python tools/ref/gen_requant_fixture.py   (needs only `pip install gguf`)
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

rng = np.random.default_rng(4321)
root = pathlib.Path(__file__).resolve().parents[2]
# 8 blocks of 32: normal values at several scales, an all-zero block, a constant block, a block whose
# largest magnitude appears twice with opposite signs, and heavy tails.
rows = [
    rng.normal(0, 0.02, 32),
    rng.normal(0, 1.0, 32),
    rng.normal(0.3, 5e-4, 32),
    np.zeros(32),
    np.full(32, -0.125),
    np.concatenate([[0.5, -0.5], rng.uniform(-0.4, 0.4, 30)]),
    rng.standard_t(2, 32) * 0.05,
    rng.uniform(-1e-3, 2e-3, 32),
]
x = np.concatenate(rows).astype(np.float32)
out = {"input_hex": x.tobytes().hex()}
for qt in [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]:
    out[qt.name] = quants.quantize(x.reshape(1, -1), qt).tobytes().hex()
p = root / "tests/fixtures/quant_encode.json"
p.write_text(json.dumps(out, indent=1) + "\n")
print(p, p.stat().st_size, "bytes")
