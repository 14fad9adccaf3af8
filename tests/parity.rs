//! Logits against HF transformers references (fixtures made by tools/ref/gen_fixtures.py), for
//! HF folders and llama.cpp-converted GGUF files, and prefill-then-decode against a full forward.

mod common;
use common::*;
use elastica::{Cache, Logits};

const TOL: f32 = 1e-4;

fn check_hf(name: &str) {
    let r = reference(name);
    let m = load(&fixture(name));
    let got = logits_all(&m, &r.tokens, "full");
    let d = rel_diff(&got, &r.logits);
    println!("{name}: max |Δ| / max |logit| = {d:.2e}");
    assert!(d < TOL, "{name}: relative difference {d} vs transformers");
}

#[test]
fn nemotron_h_dense_matches_transformers() {
    check_hf("nemotron_h_dense");
}

#[test]
fn nemotron_h_moe_matches_transformers() {
    check_hf("nemotron_h_moe");
}

#[test]
fn llama_matches_transformers() {
    check_hf("llama_tiny");
}

#[test]
fn nemotron_h_gguf_matches_transformers() {
    for name in ["nemotron_h_dense", "nemotron_h_moe"] {
        let r = reference(name);
        let m = load(&fixture(name).join("model-f32.gguf"));
        let got = logits_all(&m, &r.tokens, "full");
        let d = rel_diff(&got, &r.logits);
        println!("{name} gguf: {d:.2e}");
        assert!(d < TOL, "{name} gguf: relative difference {d}");
    }
}

/// Prefill of the first k tokens, then one token at a time (and a multi-token continuation),
/// must give the logits of one full forward.
#[test]
fn prefill_then_decode_equals_full_forward() {
    for name in ["nemotron_h_dense", "nemotron_h_moe", "llama_tiny"] {
        let r = reference(name);
        let m = load(&fixture(name));
        let full = logits_all(&m, &r.tokens, "full");
        let b = m.full_budget();
        for split in [1, 5, 13] {
            let mut c = Cache::new(&m, 64);
            let mut got: Vec<Vec<f32>> = m
                .forward(&r.tokens[..split], &b, &mut c, Logits::All)
                .unwrap()
                .chunks(m.vocab)
                .map(|x| x.to_vec())
                .collect();
            let mut i = split;
            while i < r.tokens.len() {
                // one token, then a chunk of three, alternating
                let n = if (i - split) % 4 == 0 {
                    1
                } else {
                    3.min(r.tokens.len() - i)
                };
                let out = m
                    .forward(&r.tokens[i..i + n], &b, &mut c, Logits::All)
                    .unwrap();
                got.extend(out.chunks(m.vocab).map(|x| x.to_vec()));
                i += n;
            }
            let d = rel_diff(&got, &full);
            println!("{name} split {split}: {d:.2e}");
            assert!(
                d < 1e-5,
                "{name}: prefill {split} then decode differs by {d}"
            );
        }
    }
}

/// Block dequantization against gguf-py (llama.cpp's reference implementation of the formats).
#[test]
fn block_formats_match_gguf_py() {
    use elastica::tensor::DType;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant_blocks.json")).unwrap())
            .unwrap();
    for (name, dt) in [
        ("Q4_0", DType::Q4_0),
        ("Q4_1", DType::Q4_1),
        ("Q5_0", DType::Q5_0),
        ("Q5_1", DType::Q5_1),
        ("Q8_0", DType::Q8_0),
        ("Q4_K", DType::Q4K),
        ("Q5_K", DType::Q5K),
        ("Q6_K", DType::Q6K),
    ] {
        let e = &v[name];
        let hex = e["hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = e["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(dt.block_bytes() as u64, e["block_bytes"].as_u64().unwrap());
        let mut got = vec![0f32; want.len()];
        elastica::kernels::quant::dequant_row(dt, &bytes, 0, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
                "{name}[{i}]: {a} vs {b}"
            );
        }
    }
}

/// Re-quantization (what elastify writes for quantized inputs) against gguf-py's quantizers, byte
/// for byte, and the round trip through our dequantization within half a quantization step.
#[test]
fn quantizers_match_gguf_py() {
    use elastica::kernels::quant::{dequant_row, quantize_row};
    use elastica::tensor::DType;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("quant_encode.json")).unwrap())
            .unwrap();
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let x: Vec<f32> = hex(v["input_hex"].as_str().unwrap())
        .chunks(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    for (name, dt, levels) in [
        ("Q4_0", DType::Q4_0, 16.0),
        ("Q4_1", DType::Q4_1, 15.0),
        ("Q5_0", DType::Q5_0, 32.0),
        ("Q5_1", DType::Q5_1, 31.0),
        ("Q8_0", DType::Q8_0, 254.0),
    ] {
        let want = hex(v[name].as_str().unwrap());
        let mut got = vec![];
        quantize_row(dt, &x, &mut got);
        assert_eq!(got.len(), want.len(), "{name}: length");
        let bb = dt.block_bytes();
        for (b, (g, w)) in got.chunks(bb).zip(want.chunks(bb)).enumerate() {
            assert_eq!(g, w, "{name}: block {b} differs from gguf-py");
        }
        // The searched blocks elastify writes: never worse than the reference, block by block,
        // and better on the whole row.
        let mut best = vec![];
        elastica::kernels::quant::quantize_row_best(dt, &x, None, &mut best);
        let mut rb = vec![0f32; x.len()];
        let mut bb_ = vec![0f32; x.len()];
        dequant_row(dt, &got, 0, &mut rb);
        dequant_row(dt, &best, 0, &mut bb_);
        let sse = |y: &[f32], r: std::ops::Range<usize>| -> f64 {
            r.map(|i| ((x[i] - y[i]) as f64).powi(2)).sum()
        };
        for b in 0..x.len() / 32 {
            let r = 32 * b..32 * b + 32;
            assert!(
                sse(&bb_, r.clone()) <= sse(&rb, r.clone()),
                "{name} block {b}: searched {} > reference {}",
                sse(&bb_, r.clone()),
                sse(&rb, r)
            );
        }
        if dt != DType::Q8_0 {
            assert!(
                sse(&bb_, 0..x.len()) < sse(&rb, 0..x.len()),
                "{name}: no gain"
            );
        }
        let mut back = vec![0f32; x.len()];
        dequant_row(dt, &got, 0, &mut back);
        for (b, (xb, yb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
            let lo = xb.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = xb.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let span = if matches!(dt, DType::Q4_1 | DType::Q5_1) {
                hi - lo
            } else {
                2.0 * lo.abs().max(hi.abs())
            };
            // Half a step (a whole one for Q4_0/Q5_0, which map the largest magnitude to -8/-16 and
            // clip the other side at +7/+15), plus the f16 rounding of the scale and minimum.
            let half = if matches!(dt, DType::Q4_0 | DType::Q5_0) {
                1.0
            } else {
                0.5
            };
            let tol = half * span / levels + 2e-3 * lo.abs().max(hi.abs()) + 1e-7;
            for (a, c) in xb.iter().zip(yb) {
                assert!(
                    (a - c).abs() <= tol,
                    "{name} block {b}: {a} -> {c} (tol {tol})"
                );
            }
        }
    }
}
