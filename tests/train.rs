//! Nested training: the training graph against the engine, gradients against finite
//! differences, checkpoints and resume, refusals.
mod common;
use candle_core::{DType, Tensor as CT, Var};
use common::fixture;
use elastica::train::masks::Masks;
use elastica::train::net::Net;
use elastica::{Cache, Logits};

const CASES: [(&str, &str, &str); 5] = [
    ("nemotron_h_dense", "", "hidden=48,ffn=64,heads=2,mamba_heads=4,mamba_head_dim=8"),
    ("nemotron_h_dense", "model-f32.gguf", "hidden=40,ffn=32,heads=2,mamba_heads=6,mamba_head_dim=12"),
    ("nemotron_h_moe", "", "hidden=48,moe_ffn=16,experts=4,shared_ffn=24,heads=2,mamba_heads=4,mamba_head_dim=8"),
    ("nemotron_h_moe", "model-f32.gguf", "hidden=56,moe_ffn=24,experts=6,shared_ffn=16,mamba_head_dim=8"),
    ("llama_tiny", "", "hidden=48,ffn=64,heads=2"),
];

fn open(name: &str, file: &str) -> elastica::models::Checkpoint {
    let p = if file.is_empty() { fixture(name) } else { fixture(name).join(file) };
    elastica::models::open(&p).unwrap()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 11 + 5) % 256).collect()
}

/// The masked training forward equals the engine's forward (= the physical slice) for every
/// layer type, under the full budget and a sub-budget, in f32 and f64.
#[test]
fn masked_forward_matches_engine() {
    for (name, file, sub) in CASES {
        let ck = open(name, file);
        let m = &ck.model;
        for dt in [DType::F32, DType::F64] {
            let net = Net::from_model(m, &ck.raw, dt).unwrap();
            for spec in ["full", sub] {
                let b = m.budget(spec).unwrap();
                let masks = Masks::hard(&m.shape, &b, dt).unwrap();
                let (nb, t) = (2, 37);
                let toks: Vec<u32> = (0..nb).flat_map(|s| tokens(t, s as u32)).collect();
                let got: Vec<f32> = net.forward(&toks, nb, t, &masks).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut want = vec![];
                for s in toks.chunks(t) {
                    let mut c = Cache::new(m, 64);
                    want.extend_from_slice(m.forward(s, &b, &mut c, Logits::All).unwrap());
                }
                let mx = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let md = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                eprintln!("{name} {file} {dt:?} {spec}: rel {:.2e}", md / mx);
                assert!(md / mx < 2e-5, "{name} {file} {spec} {dt:?}: rel diff {}", md / mx);
            }
        }
    }
}
