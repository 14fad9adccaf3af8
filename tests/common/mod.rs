#![allow(dead_code)]
use elastica::{Cache, Logits, Model};
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub struct Reference {
    pub tokens: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
}

pub fn reference(name: &str) -> Reference {
    let p = fixture(name).join("reference.json");
    parse_reference(&serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap())
}

/// `{"tokens": [...], "logits": [[...], ...]}` as recorded by the reference scripts.
pub fn parse_reference(v: &serde_json::Value) -> Reference {
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Reference { tokens, logits }
}

pub fn load(path: &std::path::Path) -> Model {
    elastica::models::load(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// All-position logits of a full forward under `budget`.
pub fn logits_all(m: &Model, tokens: &[u32], budget: &str) -> Vec<Vec<f32>> {
    let b = m.budget(budget).unwrap();
    let mut c = Cache::new(m, 256.max(tokens.len()));
    let out = m.forward(tokens, &b, &mut c, Logits::All).unwrap();
    out.chunks(m.vocab).map(|r| r.to_vec()).collect()
}

/// max |a-b| / max |b| over all positions.
pub fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut md = 0f32;
    let mut mx = 0f32;
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            md = md.max((x - y).abs());
            mx = mx.max(y.abs());
        }
    }
    md / mx
}
