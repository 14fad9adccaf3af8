#!/usr/bin/env python3
"""Independent check of elastica's FP8/NVFP4 checkpoints: dequantize a ModelOpt-layout HF
checkpoint with the formulas of NVIDIA ModelOpt and vLLM's ModelOpt loader, and compare every
value with a float copy elastica wrote of the same checkpoint (`elastica slice --dtype f32`).

- FP8:   w = e4m3(weight) * weight_scale
- NVFP4: w = e2m1(weight nibble) * e4m3(weight_scale[row, col // 16]) * weight_scale_2,
         nibble 2i of byte i is the low one (value 2i), 2i+1 the high one.

The products are formed exactly (Python floats hold them: at most 3 + 4 + 24 significant bits)
and rounded once to float32, as a fused dequantize-and-multiply does. Also checks the layout:
hf_quant_config.json, config.json's quantization_config, dtypes and shapes.

Pure standard library (json, struct), so it runs wherever Python 3 does.
Usage: modelopt_dequant.py QUANT_DIR FLOAT_DIR  -> prints a JSON summary; exit 1 on a mismatch.
"""
import json
import struct
import sys


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    header.pop("__metadata__", None)
    return header, data


def raw(header, data, name):
    h = header[name]
    a, b = h["data_offsets"]
    return h["dtype"], h["shape"], data[a:b]


def e4m3(b):
    """OCP E4M3 (fn) byte -> float; 0x7F/0xFF are NaN."""
    s = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 7
    if e == 0xF and m == 7:
        return float("nan")
    if e == 0:
        return s * m / 8.0 * 2.0 ** -6
    return s * (1.0 + m / 8.0) * 2.0 ** (e - 7)


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def f32(x):
    """Round a Python float to float32 (the bits, as an int)."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_scalar(dtype, b):
    assert dtype == "F32", dtype
    return struct.unpack("<f", b)[0]


def main(qdir, fdir):
    qcfg = json.load(open(f"{qdir}/hf_quant_config.json"))
    algo = qcfg["quantization"]["quant_algo"]
    assert qcfg["producer"]["name"] == "modelopt", qcfg["producer"]
    cfg = json.load(open(f"{qdir}/config.json"))["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["quant_algo"] == algo, cfg
    if algo == "NVFP4":
        assert qcfg["quantization"]["group_size"] == 16
    qh, qd = read_safetensors(f"{qdir}/model.safetensors")
    fh, fd = read_safetensors(f"{fdir}/model.safetensors")
    tensors = values = mismatches = 0
    first = None
    for name in sorted(qh):
        dtype = qh[name]["dtype"]
        if not name.endswith(".weight") or dtype not in ("F8_E4M3", "U8"):
            continue
        base = name[: -len(".weight")]
        _, shape, w = raw(qh, qd, name)
        sdt, sshape, s = raw(qh, qd, base + ".weight_scale")
        fdt, fshape, fbytes = raw(fh, fd, name)
        assert fdt == "F32", (name, fdt)
        rows = shape[0]
        if dtype == "F8_E4M3":
            assert algo == "FP8" and sshape == [], (name, sshape)
            cols = shape[1]
            scale = f32_scalar(sdt, s)
            want = [f32(e4m3(w[i]) * scale) for i in range(rows * cols)]
        else:
            assert algo == "NVFP4" and sdt == "F8_E4M3", (name, sdt)
            cols = 2 * shape[1]
            assert sshape == [rows, cols // 16], (name, sshape)
            s2 = f32_scalar(*raw(qh, qd, base + ".weight_scale_2")[::2])
            want = []
            for r in range(rows):
                for c in range(cols):
                    byte = w[r * cols // 2 + c // 2]
                    nib = byte >> 4 if c % 2 else byte & 0xF
                    bs = e4m3(s[r * cols // 16 + c // 16] & 0x7F)
                    want.append(f32(E2M1[nib] * bs * s2))
        assert fshape == [rows, cols], (name, fshape, rows, cols)
        got = struct.unpack(f"<{rows * cols}I", fbytes)
        tensors += 1
        values += rows * cols
        for i, (g, x) in enumerate(zip(got, want)):
            # +0 and -0 are the same value.
            if g != x and not (g & 0x7FFFFFFF == 0 and x & 0x7FFFFFFF == 0):
                mismatches += 1
                if first is None:
                    first = {"tensor": name, "index": i, "elastica": hex(g), "reference": hex(x)}
    out = {"algo": algo, "tensors": tensors, "values": values, "mismatches": mismatches}
    if first:
        out["first_mismatch"] = first
    print(json.dumps(out))
    return 0 if tensors > 0 and mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
