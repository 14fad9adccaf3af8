"""Reference dequantization for the block formats elastica reads (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K),
computed with gguf-py (llama.cpp's Python package). Writes tests/fixtures/quant_blocks.json:
random blocks (with sane f16 scales) and their dequantized values.

Usage: .venv-ref/bin/python tools/ref/gen_quant_fixture.py
"""
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES

rng = np.random.default_rng(1234)
root = pathlib.Path(__file__).resolve().parents[2]
out = {}
# byte offsets of f16 scale fields per block, set to finite values of moderate size
scale_fields = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
for qt in [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
    bl, bb = GGML_QUANT_SIZES[qt]
    nblocks = 4
    raw = rng.integers(0, 256, size=(nblocks, bb), dtype=np.uint8)
    for off in scale_fields[qt]:
        vals = rng.uniform(-0.05, 0.05, size=nblocks).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(nblocks, 2)
    deq = quants.dequantize(raw.reshape(-1), qt)
    assert deq.size == nblocks * bl and np.all(np.isfinite(deq))
    out[qt.name] = {"block_len": bl, "block_bytes": bb, "hex": raw.tobytes().hex(), "values": [float(x) for x in deq.reshape(-1)]}
p = root / "tests/fixtures/quant_blocks.json"
p.write_text(json.dumps(out))
print(p, p.stat().st_size, "bytes")
