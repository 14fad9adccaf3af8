//! Every instruction-set level gives the same model: the AVX2 and portable kernels (forced with
//! ELASTICA_ISA=avx2 / ELASTICA_NO_SIMD=1 in a child process) match transformers on the fixtures
//! and agree with the native kernels on the quantized SmolLM2 file.

mod common;
use common::*;
use std::process::Command;

const LEVELS: [(&str, &str); 2] = [("ELASTICA_ISA", "avx2"), ("ELASTICA_NO_SIMD", "1")];

#[test]
fn fixtures_match_transformers_at_every_isa() {
    for level in LEVELS {
        for (name, file) in [
            ("nemotron_h_dense", ""),
            ("nemotron_h_moe", ""),
            ("nemotron_h_moe", "model-f32.gguf"),
            ("llama_tiny", ""),
        ] {
            let r = reference(name);
            let p = if file.is_empty() {
                fixture(name)
            } else {
                fixture(name).join(file)
            };
            let d = rel_diff(&logits_cli(&[level], &p, &r.tokens), &r.logits);
            assert!(d < 1e-4, "{name} {file} under {level:?}: {d}");
        }
    }
}

#[test]
fn quantized_model_agrees_across_isas() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        assert!(
            Command::new("bash")
                .arg(
                    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                        .join("scripts/fetch-model.sh")
                )
                .status()
                .unwrap()
                .success(),
            "could not fetch SmolLM2"
        );
    }
    let toks: Vec<u32> = (0..24).map(|i| 100 + 37 * i).collect();
    // Exact mode removes the per-ISA activation rounding: all levels compute the same f32 math.
    let base = logits_cli(&[("ELASTICA_EXACT", "1")], &p, &toks);
    for level in LEVELS {
        let d = rel_diff(
            &logits_cli(&[level, ("ELASTICA_EXACT", "1")], &p, &toks),
            &base,
        );
        assert!(d < 1e-4, "exact mode under {level:?}: {d}");
        // Default mode: each level rounds activations its own way (bf16 or not); close, not equal.
        let d = rel_diff(&logits_cli(&[level], &p, &toks), &base);
        assert!(d < 0.02, "default mode under {level:?}: {d}");
    }
}
