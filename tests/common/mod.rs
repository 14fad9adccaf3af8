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

/// The fixtures (HF and GGUF) with a sub-budget cutting every axis they have.
pub fn fixtures() -> Vec<(String, Model, &'static str)> {
    let cases = [
        (
            "nemotron_h_dense",
            "",
            "hidden=48,ffn=64,heads=2,mamba_heads=4,mamba_head_dim=8",
        ),
        (
            "nemotron_h_moe",
            "",
            "hidden=48,moe_ffn=16,experts=4,shared_ffn=24,heads=2,mamba_heads=4,mamba_head_dim=8",
        ),
        (
            "nemotron_h_moe",
            "model-f32.gguf",
            "hidden=56,moe_ffn=24,experts=6,shared_ffn=16,mamba_head_dim=8",
        ),
        ("llama_tiny", "", "hidden=48,ffn=64,heads=2"),
    ];
    cases
        .into_iter()
        .map(|(name, file, sub)| {
            let p = if file.is_empty() {
                fixture(name)
            } else {
                fixture(name).join(file)
            };
            (format!("{name} {file}"), load(&p), sub)
        })
        .collect()
}

pub fn smollm2() -> Option<Model> {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then(|| load(&p))
}

/// The fixtures, then SmolLM2 Q4_1 when present, each with a sub-budget.
pub fn fixtures_and_smollm2() -> Vec<(String, Model, String)> {
    let mut models: Vec<(String, Model, String)> = fixtures()
        .into_iter()
        .map(|(n, m, s)| (n, m, s.to_string()))
        .collect();
    if let Some(m) = smollm2() {
        models.push((
            "smollm2 q4_1".into(),
            m,
            "hidden=288,ffn=768,heads=6".into(),
        ));
    }
    models
}

/// Runs the elastica binary: (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    cli_env(&[], args)
}

/// [`cli`] with extra environment (an ISA level, exact mode).
pub fn cli_env(env: &[(&str, &str)], args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), s(&out.stdout), s(&out.stderr))
}

/// All-position logits from `elastica logits --json` run with extra environment (e.g. an ISA
/// level or exact mode) in a child process.
pub fn logits_cli(env: &[(&str, &str)], model: &std::path::Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    let toks: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let (ok, out, err) = cli_env(
        env,
        &[
            "logits",
            model.to_str().unwrap(),
            "--tokens",
            &toks.join(","),
            "--json",
        ],
    );
    assert!(ok, "{err}");
    parse_reference(&serde_json::from_str(&out).unwrap()).logits
}
