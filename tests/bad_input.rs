//! Malformed input gives a clear error naming the file, tensor or field, a non-zero exit and no
//! panic — checked through the real binary.

mod common;
use common::fixture;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    d
}

/// Runs elastica and asserts a clean failure whose message contains every `needles` entry.
fn fails(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(
        err.starts_with("error: "),
        "{args:?}: unexpected stderr {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err:?}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A safetensors file from a header (JSON) and a data section.
fn safetensors(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

#[test]
fn corrupt_safetensors() {
    let d = copy_fixture("llama_tiny", "st");
    let st = d.join("model.safetensors");
    let orig = std::fs::read(&st).unwrap();
    // Truncated data.
    std::fs::write(&st, &orig[..orig.len() / 2]).unwrap();
    fails(
        &["info", s(&d)],
        &["model.safetensors", "invalid safetensors"],
    );
    // Header length past the end of the file (and a forged huge length).
    let mut v = orig.clone();
    v[..8].copy_from_slice(&(orig.len() as u64 * 4).to_le_bytes());
    std::fs::write(&st, &v).unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
    v[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&st, &v).unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
    // Overlapping offsets.
    std::fs::write(&st, safetensors(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#, 24)).unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
    // Offsets out of range.
    std::fs::write(
        &st,
        safetensors(
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1600]}}"#,
            16,
        ),
    )
    .unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
    // dtype/shape that do not match the byte length.
    std::fs::write(
        &st,
        safetensors(
            r#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#,
            16,
        ),
    )
    .unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
    // Not JSON at all.
    std::fs::write(&st, safetensors("{nope", 0)).unwrap();
    fails(&["info", s(&d)], &["model.safetensors"]);
}

#[test]
fn missing_tensor_and_shape_mismatch() {
    // Missing tensor: write a safetensors without one layer norm.
    let d = copy_fixture("llama_tiny", "missing");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let keep: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.post_attention_layernorm.weight")
        .collect();
    safetensors::serialize_to_file(keep, None, &d.join("model.safetensors.new")).unwrap();
    std::fs::rename(d.join("model.safetensors.new"), d.join("model.safetensors")).unwrap();
    fails(
        &["info", s(&d)],
        &["model.layers.1.post_attention_layernorm.weight", "missing"],
    );

    // Shape mismatch with config.json.
    let d = copy_fixture("nemotron_h_dense", "shape");
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 128");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    fails(
        &["info", s(&d)],
        &["up_proj.weight", "does not match the config"],
    );
}

#[test]
fn bad_config() {
    let d = copy_fixture("nemotron_h_dense", "cfg");
    let orig = std::fs::read_to_string(d.join("config.json")).unwrap();
    std::fs::write(
        d.join("config.json"),
        orig.replace("\"nemotron_h\"", "\"gpt_neox\"")
            .replace("NemotronHForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    fails(
        &["info", s(&d)],
        &["config.json", "unknown architecture", "gpt_neox"],
    );
    std::fs::write(
        d.join("config.json"),
        orig.replace("\"M*-M-*M-\"", "\"M*-M-*MX\""),
    )
    .unwrap();
    fails(&["info", s(&d)], &["hybrid_override_pattern", "'X'"]);
    std::fs::write(
        d.join("config.json"),
        orig.replace("\"num_hidden_layers\": 8", "\"num_hidden_layers\": 9"),
    )
    .unwrap();
    fails(&["info", s(&d)], &["num_hidden_layers"]);
    std::fs::write(
        d.join("config.json"),
        orig.replace("\"n_groups\": 2", "\"n_groups\": 3"),
    )
    .unwrap();
    fails(&["info", s(&d)], &["n_groups"]);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    fails(&["info", s(&d)], &["config.json", "invalid JSON"]);
    std::fs::remove_file(d.join("config.json")).unwrap();
    fails(&["info", s(&d)], &["config.json"]);
    fails(&["info", "/nonexistent/model"], &["/nonexistent/model"]);
}

/// Minimal GGUF writer for forging files: (key, type, value bytes) metadata and tensor infos.
struct G {
    kv: Vec<u8>,
    n_kv: u64,
    infos: Vec<u8>,
    n_t: u64,
    data: Vec<u8>,
}

impl G {
    fn new() -> G {
        G {
            kv: vec![],
            n_kv: 0,
            infos: vec![],
            n_t: 0,
            data: vec![],
        }
    }
    fn str_bytes(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }
    fn kv_str(mut self, k: &str, v: &str) -> G {
        self.kv.extend(G::str_bytes(k));
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend(G::str_bytes(v));
        self.n_kv += 1;
        self
    }
    fn kv_u32(mut self, k: &str, v: u32) -> G {
        self.kv.extend(G::str_bytes(k));
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }
    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: usize) -> G {
        self.infos.extend(G::str_bytes(name));
        self.infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend(d.to_le_bytes());
        }
        self.infos.extend(ty.to_le_bytes());
        self.infos.extend((self.data.len() as u64).to_le_bytes());
        self.data
            .extend(std::iter::repeat_n(0u8, bytes.next_multiple_of(32)));
        self.n_t += 1;
        self
    }
    fn bytes(&self, n_t: u64, n_kv: u64) -> Vec<u8> {
        let mut v = b"GGUF".to_vec();
        v.extend(3u32.to_le_bytes());
        v.extend(n_t.to_le_bytes());
        v.extend(n_kv.to_le_bytes());
        v.extend(&self.kv);
        v.extend(&self.infos);
        while !v.len().is_multiple_of(32) {
            v.push(0);
        }
        v.extend(&self.data);
        v
    }
    fn write(&self, p: &Path) {
        std::fs::write(p, self.bytes(self.n_t, self.n_kv)).unwrap();
    }
}

#[test]
fn corrupt_gguf() {
    let d = tmpdir("gguf");
    let p = d.join("m.gguf");
    let ps = s(&p);
    std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
    fails(&["info", ps], &["m.gguf", "bad magic"]);
    std::fs::write(&p, b"GG").unwrap();
    fails(&["info", ps], &["m.gguf", "not a GGUF"]);
    let ok = G::new().kv_str("general.architecture", "llama").tensor(
        "token_embd.weight",
        &[64, 256],
        0,
        64 * 256 * 4,
    );
    // Counts past the end of the file.
    std::fs::write(&p, ok.bytes(1 << 40, 1)).unwrap();
    fails(&["info", ps], &["m.gguf", "tensor count"]);
    std::fs::write(&p, ok.bytes(1, u64::MAX / 2)).unwrap();
    fails(&["info", ps], &["m.gguf", "metadata count"]);
    // Unknown tensor type.
    G::new()
        .kv_str("general.architecture", "llama")
        .tensor("token_embd.weight", &[64, 256], 99, 1024)
        .write(&p);
    fails(
        &["info", ps],
        &["m.gguf", "token_embd.weight", "unsupported ggml type 99"],
    );
    // Tensor data past the end.
    let mut b = ok.bytes(1, 1);
    b.truncate(b.len() - 100);
    std::fs::write(&p, b).unwrap();
    fails(
        &["info", ps],
        &["m.gguf", "token_embd.weight", "past the end"],
    );
    // Unknown value type and a forged string length.
    let mut g = G::new().kv_str("general.architecture", "llama");
    g.kv.extend(G::str_bytes("x"));
    g.kv.extend(77u32.to_le_bytes());
    g.n_kv += 1;
    g.write(&p);
    fails(&["info", ps], &["m.gguf", "unknown value type 77"]);
    let mut g = G::new();
    g.kv.extend((u64::MAX - 3).to_le_bytes());
    g.n_kv = 1;
    g.write(&p);
    fails(&["info", ps], &["m.gguf"]);
    // Unknown architecture, then a known one with missing tensors / metadata.
    G::new()
        .kv_str("general.architecture", "falcon")
        .tensor("token_embd.weight", &[64, 256], 0, 64 * 256 * 4)
        .write(&p);
    fails(&["info", ps], &["m.gguf", "unknown architecture", "falcon"]);
    ok.write(&p);
    fails(&["info", ps], &["m.gguf", "llama.embedding_length"]);
    G::new()
        .kv_str("general.architecture", "llama")
        .kv_u32("llama.embedding_length", 64)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.feed_forward_length", 96)
        .kv_u32("llama.attention.head_count", 4)
        .tensor("token_embd.weight", &[64, 256], 0, 64 * 256 * 4)
        .write(&p);
    fails(&["info", ps], &["blk.0.attn_norm.weight", "missing"]);
}

#[test]
fn bad_budgets() {
    let d = fixture("nemotron_h_dense");
    let m = s(&d);
    fails(
        &["logits", m, "--tokens", "1,2", "--budget", "hidden=65"],
        &["hidden=65", "exceeds the parent's 64"],
    );
    fails(
        &["logits", m, "--tokens", "1,2", "--budget", "heads=3"],
        &["heads=3", "group structure"],
    );
    fails(
        &["logits", m, "--tokens", "1,2", "--budget", "mamba_heads=5"],
        &["mamba_heads=5", "group structure"],
    );
    fails(
        &["logits", m, "--tokens", "1,2", "--budget", "colour=3"],
        &["unknown axis"],
    );
    fails(
        &["logits", m, "--tokens", "1,2", "--budget", "small"],
        &["no elastic manifest"],
    );
    let e = fixture("nemotron_h_moe");
    fails(
        &["logits", s(&e), "--tokens", "1,2", "--budget", "experts=3"],
        &["experts=3", "group structure"],
    );
}

/// `--panel-budget` is resolved like `--budget` and named in the error; it conflicts with
/// `--no-panels`.
#[test]
fn bad_panel_budgets() {
    let d = fixture("llama_tiny");
    let m = s(&d);
    for cmd in [
        &["bench", m, "-p", "4", "-n", "2", "-r", "1"][..],
        &["run", m, "-p", "hi", "-n", "1"],
    ] {
        let with = |extra: &[&'static str]| -> Vec<&str> { [cmd, extra].concat() };
        fails(
            &with(&["--panel-budget", "hidden=65"]),
            &["--panel-budget hidden=65", "exceeds the parent's 64"],
        );
        fails(
            &with(&["--panel-budget", "colour=3"]),
            &["--panel-budget colour=3", "unknown axis"],
        );
        fails(&with(&["--panel-budget", ""]), &["--panel-budget", "empty"]);
        fails(
            &with(&["--panel-budget", "small"]),
            &["--panel-budget small", "no elastic manifest"],
        );
        fails(
            &with(&["--no-panels", "--panel-budget", "hidden=32"]),
            &["--no-panels", "--panel-budget"],
        );
    }
}

#[test]
fn bad_runtime_input() {
    let d = fixture("llama_tiny");
    let m = s(&d);
    fails(
        &["logits", m, "--tokens", "1,999"],
        &["999", "outside the vocabulary"],
    );
    fails(&["logits", m, "--tokens", "1,x"], &["--tokens", "\"x\""]);
    let long = "a".repeat(100);
    fails(
        &["run", m, "-p", &long, "--ctx", "16"],
        &["prompt has 100 tokens", "context of 16"],
    );
    // Missing tokenizer: `run` needs one, `logits --tokens` does not.
    let c = copy_fixture("llama_tiny", "tok");
    std::fs::remove_file(c.join("tokenizer.json")).unwrap();
    fails(&["run", s(&c), "-p", "hi"], &["tokenizer.json", "missing"]);
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(["logits", s(&c), "--tokens", "1,2,3", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Perplexity: missing file, non-UTF-8 text, text too short.
    let t = tmpdir("ppl");
    fails(
        &["perplexity", m, "-f", s(&t.join("none.txt"))],
        &["none.txt"],
    );
    std::fs::write(t.join("bin.txt"), [0xffu8, 0xfe, 0x41]).unwrap();
    fails(
        &["perplexity", m, "-f", s(&t.join("bin.txt"))],
        &["bin.txt", "UTF-8"],
    );
    std::fs::write(t.join("short.txt"), "tiny").unwrap();
    fails(
        &[
            "perplexity",
            m,
            "-f",
            s(&t.join("short.txt")),
            "--ctx",
            "64",
        ],
        &["needs at least 128"],
    );
    fails(&["-t", "0", "info", m], &["--threads"]);
}

#[test]
fn bad_manifests() {
    let d = copy_fixture("nemotron_h_dense", "manifest");
    let full = "hidden=64,ffn=96,heads=4,mamba_heads=8,mamba_head_dim=16";
    let write =
        |v: serde_json::Value| std::fs::write(d.join("elastic.json"), v.to_string()).unwrap();
    let m = d.to_str().unwrap();
    let b = |budgets: serde_json::Value| serde_json::json!({"format": "elastica.manifest/1", "parent": full, "budgets": budgets});
    write(b(
        serde_json::json!([{"name": "a", "spec": "hidden=32"}, {"name": "b", "spec": "hidden=48"}]),
    ));
    fails(&["info", m], &["manifest budget \"b\"", "not nested"]);
    write(b(serde_json::json!([{"name": "a", "spec": "hidden=32"}])));
    fails(
        &["logits", m, "--tokens", "1", "--budget", "zzz"],
        &["no budget named \"zzz\"", "a"],
    );
    write(b(serde_json::json!([{"name": "a", "spec": "hidden=640"}])));
    fails(&["info", m], &["manifest budget \"a\"", "exceeds"]);
    write(
        serde_json::json!({"format": "elastica.manifest/1", "parent": "hidden=128", "budgets": []}),
    );
    fails(&["info", m], &["manifest.parent"]);
    write(serde_json::json!({"format": "other/1", "parent": full, "budgets": []}));
    fails(&["info", m], &["elastic.json", "format"]);
    std::fs::write(d.join("elastic.json"), "{").unwrap();
    fails(&["info", m], &["elastic.json", "invalid JSON"]);
}

/// Targets between a manifest's budgets (issue 11, point 7): unknown names, targets out of range
/// or below the smallest budget, malformed counts, no manifest, a broken `mass` curve.
#[test]
fn bad_budget_targets() {
    let d = copy_fixture("llama_tiny", "targets");
    let m = s(&d);
    let manifest = |mass: serde_json::Value| {
        let mut v = serde_json::json!({"format": "elastica.manifest/1", "parent": "hidden=64,ffn=96,heads=4",
            "budgets": [{"name": "big", "spec": "hidden=64,ffn=64,heads=4"}, {"name": "small", "spec": "hidden=48,ffn=48,heads=2"}]});
        if !mass.is_null() {
            v["mass"] = mass;
        }
        std::fs::write(d.join("elastic.json"), v.to_string()).unwrap();
    };
    let logits = |b: &str, needles: &[&str]| {
        fails(&["logits", m, "--tokens", "1,2", "--budget", b], needles)
    };
    logits("tiny", &["\"tiny\"", "no elastic manifest"]);
    logits("0.6", &["\"0.6\"", "no elastic manifest", "target"]);
    manifest(serde_json::Value::Null);
    logits("tiny", &["no budget named \"tiny\"", "big, small"]);
    for b in ["0", "-0.5", "inf", "params:0", "nan"] {
        logits(b, &[&format!("{b:?}"), "outside (0, 1]"]);
    }
    logits(
        "params:1e12",
        &["\"params:1e12\"", "more than the parent's"],
    );
    logits(
        "params:many",
        &["\"params:many\"", "not a fraction or a parameter count"],
    );
    logits(
        "0.01",
        &[
            "\"0.01\"",
            "below the smallest budget \"small\"",
            "big, small",
        ],
    );
    logits("active:0.02", &["below the smallest budget"]);
    fails(
        &["info", m, "-b", "0.05"],
        &["\"0.05\"", "below the smallest"],
    );
    // A hand-written manifest without mass still resolves (uniform rule).
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(["info", m, "--json", "-b", "0.8"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["resolved"][0]["rule"], "uniform");
    manifest(serde_json::json!({"hidden": [0.0, 1.0]}));
    fails(&["info", m], &["manifest.mass.hidden", "needs 65"]);
    manifest(serde_json::json!({"colour": [0.0]}));
    fails(&["info", m], &["manifest.mass.colour", "not an axis"]);
    manifest(serde_json::json!({"heads": [0.0, 0.5, 2.0, 1.0, 1.0]}));
    fails(&["info", m], &["manifest.mass.heads", "[0, 1]"]);
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Like [`fails`], for commands that may warn before the error.
fn fails_after_warning(args: &[&str], needles: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let body: Vec<&str> = err
        .lines()
        .skip_while(|l| l.starts_with("warning: "))
        .collect();
    assert!(
        body.first().is_some_and(|l| l.starts_with("error: ")),
        "{args:?}: unexpected stderr {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err:?}");
    }
}

#[test]
fn context_is_bounded() {
    let d = fixture("llama_tiny");
    let m = s(&d);
    // Above the trained context (256): refused without --force-ctx, by every command that sizes
    // a cache from the command line.
    let ctx = [
        "--ctx 100000",
        "exceeds the model's trained context of 256",
        "--force-ctx",
    ];
    fails(&["run", m, "-p", "hi", "--ctx", "100000"], &ctx);
    let t = tmpdir("ctx");
    let text = t.join("t.txt");
    std::fs::write(&text, "the quick brown fox. ".repeat(40)).unwrap();
    fails(&["perplexity", m, "-f", s(&text), "--ctx", "100000"], &ctx);
    let prompts = t.join("p.txt");
    std::fs::write(&prompts, "hi\n").unwrap();
    let out = t.join("o.jsonl");
    fails(
        &[
            "gen-data",
            m,
            "--prompts",
            s(&prompts),
            "--out",
            s(&out),
            "--ctx",
            "100000",
        ],
        &ctx,
    );
    fails(
        &["bench", m, "-p", "100000", "-n", "1"],
        &["-p 100000", "trained context of 256"],
    );
    let long: Vec<String> = (0..300).map(|i| (i % 200).to_string()).collect();
    fails(
        &["logits", m, "--tokens", &long.join(",")],
        &["300 tokens", "trained context of 256"],
    );
    // Forced: memory that cannot be had is a clear error naming the context and its bytes (it
    // used to abort with "memory allocation of ... bytes failed").
    fails_after_warning(
        &[
            "run",
            m,
            "-p",
            "hi",
            "--ctx",
            "1000000000000000",
            "--force-ctx",
        ],
        &[
            "context of 1000000000000000 tokens needs",
            "bytes",
            "could not be allocated",
        ],
    );
    fails_after_warning(
        &[
            "run",
            m,
            "-p",
            "hi",
            "--ctx",
            &u64::MAX.to_string(),
            "--force-ctx",
        ],
        &["more cache memory than this machine can address"],
    );
    fails_after_warning(
        &[
            "bench",
            m,
            "-p",
            "1000000000000000",
            "-n",
            "0",
            "--force-ctx",
        ],
        &["could not be allocated"],
    );
    assert!(!out.exists());
}

#[test]
fn numeric_flags_are_bounded() {
    let d = fixture("llama_tiny");
    let m = s(&d);
    // Negative numbers parse as values and are refused by name (not "unexpected argument").
    fails(
        &["run", m, "-p", "hi", "--temp", "-1"],
        &["'-1'", "--temp", ">= 0"],
    );
    fails(
        &["run", m, "-p", "hi", "--temp", "nan"],
        &["--temp", "finite"],
    );
    fails(
        &["run", m, "-p", "hi", "--top-p", "1.5"],
        &["--top-p", "[0, 1]"],
    );
    fails(&["run", m, "-p", "hi", "-n", "-1"], &["'-1'", "--n"]);
    fails(
        &["run", m, "-p", "hi", "--ctx", "0"],
        &["--ctx", "at least 1"],
    );
    // An empty budget is not the parent.
    fails(
        &["run", m, "-p", "hi", "--budget", ""],
        &["budget is empty"],
    );
    fails(
        &["logits", m, "--tokens", "1", "--budget", " "],
        &["budget is empty"],
    );
    // Perplexity that would score no token.
    let t = tmpdir("flags");
    let text = t.join("t.txt");
    std::fs::write(&text, "the quick brown fox. ".repeat(40)).unwrap();
    fails(
        &[
            "perplexity",
            m,
            "-f",
            s(&text),
            "--ctx",
            "64",
            "--chunks",
            "0",
        ],
        &["--chunks", "at least 1"],
    );
    fails(
        &["perplexity", m, "-f", s(&text), "--ctx", "2"],
        &["--ctx 2 scores no token"],
    );
    // Bench: nothing to measure, no repetitions.
    fails(&["bench", m, "-p", "0", "-n", "0"], &["nothing to measure"]);
    fails(
        &["bench", m, "-p", "8", "-n", "1", "-r", "0"],
        &["--reps", "not in 1..=1000"],
    );
    fails(
        &[
            "bench",
            m,
            "-p",
            "8",
            "-n",
            "1",
            "-r",
            "18446744073709551615",
        ],
        &["--reps"],
    );
    fails(&["bench", m, "-t", "-1", "-p", "8"], &["--threads", "'-1'"]);
    // gen-data writing nothing.
    let prompts = t.join("p.txt");
    std::fs::write(&prompts, "hi\n").unwrap();
    let out = t.join("o.jsonl");
    for (flag, v) in [("-n", "0"), ("--max-tokens", "0"), ("--temp", "-0.5")] {
        fails(
            &[
                "gen-data",
                m,
                "--prompts",
                s(&prompts),
                "--out",
                s(&out),
                flag,
                v,
            ],
            &[flag.trim_start_matches('-')],
        );
    }
    // rank: more samples than the text has windows (used to allocate without bound), and a depth
    // sequence too short to score.
    let calib = fixture("text/gpl-3.txt");
    let imp = t.join("imp.json");
    let rank = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "rank",
            m,
            "--calib",
            s(&calib),
            "--seq",
            "32",
            "--out",
            s(&imp),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let args = rank(&["--samples", "1000000000"]);
    fails(
        &strs(&args),
        &["only", "distinct samples of 32", "1000000000 asked"],
    );
    let args = rank(&["--samples", "2", "--depth-seq", "0"]);
    fails(&strs(&args), &["--depth-seq 0"]);
    assert!(!imp.exists());
    // elastify: a count above the parent's, a measured search of unbounded length.
    let args = rank(&["--samples", "2"]);
    let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(&args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let el = t.join("el");
    let elastify = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["elastify", m, "--importance", s(&imp), "--out", s(&el)];
        a.extend(extra);
        a.into_iter().map(String::from).collect()
    };
    fails(
        &strs(&elastify(&["--budgets", "full,1e300"])),
        &["\"1e300\"", "more than the parent's"],
    );
    fails(
        &strs(&elastify(&[
            "--budgets",
            "full,0.5",
            "--calib",
            s(&calib),
            "--solve-seq",
            "0",
        ])),
        &["--solve-seq 0"],
    );
    // The same bound without --calib (the text recorded in the importance file).
    fails(
        &strs(&elastify(&[
            "--budgets",
            "full,0.5",
            "--solve-seq",
            "1000000",
        ])),
        &["--solve-seq 1000000"],
    );
    fails(
        &strs(&elastify(&[
            "--budgets",
            "full,0.5",
            "--calib",
            s(&calib),
            "--solve-samples",
            "100000000000",
        ])),
        &["distinct samples"],
    );
    // train: NaN, out-of-range and contextless values are refused before any step.
    let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(elastify(&["--budgets", "full,0.5"]))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = t.join("run");
    let train = |flag: &str, v: &str| {
        let a = [
            "train",
            s(&el),
            "--data",
            s(&calib),
            "--out",
            s(&run),
            "--seq",
            "32",
            "--seq2",
            "32",
            "--batch",
            "2",
            "--batch2",
            "2",
            "--tokens",
            "256",
            "--no-progress",
            flag,
            v,
        ];
        a.map(String::from)
    };
    for (flag, v, needle) in [
        ("--probs", "nan,1", "--probs must be finite"),
        ("--kd-temp", "nan", "--kd-temp"),
        ("--tau", "-1", "--tau"),
        ("--lr", "inf", "--lr"),
        ("--router-init-p", "2", "--router-init-p"),
        ("--stop-after", "0", "--stop-after"),
        ("--clip", "-1", "--clip"),
    ] {
        let a = train(flag, v);
        fails(&strs(&a), &[needle]);
    }
    // --tokens 0 used to export an untrained model; --seq above the context used to run on.
    let mut a = train("--eval-seqs", "1");
    a[a.iter().position(|x| x == "--tokens").unwrap() + 1] = "0".into();
    fails(&strs(&a), &["--tokens", "at least 1"]);
    let mut a = train("--eval-seqs", "1");
    a[a.iter().position(|x| x == "--seq").unwrap() + 1] = "10000".into();
    fails(&strs(&a), &["--seq 10000", "trained context of 256"]);
    assert!(!run.join("checkpoint").exists());
    std::fs::remove_dir_all(&t).ok();
}
