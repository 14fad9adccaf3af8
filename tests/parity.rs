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
