//! The command line's machine-readable outputs (names and fields later work relies on).

mod common;
use common::*;
use serde_json::Value;
use std::process::Command;

fn run(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn logits_json_matches_library() {
    let d = fixture("nemotron_h_moe");
    let r = reference("nemotron_h_moe");
    let toks: Vec<String> = r.tokens.iter().map(|t| t.to_string()).collect();
    let v = run(&[
        "logits",
        d.to_str().unwrap(),
        "--tokens",
        &toks.join(","),
        "--budget",
        "hidden=32",
        "--json",
    ]);
    assert_eq!(v["tokens"].as_array().unwrap().len(), r.tokens.len());
    let got = parse_reference(&v).logits;
    let want = logits_all(&load(&d), &r.tokens, "hidden=32");
    assert_eq!(got.len(), want.len());
    assert!(rel_diff(&got, &want) < 1e-6);
    // Full budget through the CLI matches transformers.
    let v = run(&[
        "logits",
        d.to_str().unwrap(),
        "--tokens",
        &toks.join(","),
        "--json",
    ]);
    let got = parse_reference(&v).logits;
    assert!(rel_diff(&got, &r.logits) < 1e-4);
}

#[test]
fn perplexity_bench_info_run_json() {
    let d = fixture("llama_tiny");
    let m = d.to_str().unwrap();
    let t = std::env::temp_dir().join(format!("elastica-cli-{}.txt", std::process::id()));
    std::fs::write(
        &t,
        "the quick brown fox jumps over the lazy dog. ".repeat(8),
    )
    .unwrap();
    let v = run(&[
        "perplexity",
        m,
        "-f",
        t.to_str().unwrap(),
        "--ctx",
        "64",
        "--json",
    ]);
    assert!(v["ppl"].as_f64().unwrap() > 1.0);
    assert_eq!(v["ctx"], 64);
    assert_eq!(v["chunks"], 360 / 64);
    assert_eq!(v["tokens"], (360 / 64) * 31);
    // The same perplexity computed here from the library's logits.
    let toks: Vec<u32> = std::fs::read(&t)
        .unwrap()
        .iter()
        .map(|&b| b as u32)
        .collect();
    let model = load(&d);
    let mut nll = 0f64;
    for c in 0..360 / 64 {
        let l = logits_all(&model, &toks[c * 64..(c + 1) * 64], "full");
        for j in 32..63 {
            let row = &l[j];
            let mx = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
            nll += lse - row[toks[c * 64 + j + 1] as usize] as f64;
        }
    }
    let ppl = (nll / v["tokens"].as_f64().unwrap()).exp();
    assert!(
        (ppl - v["ppl"].as_f64().unwrap()).abs() < 1e-3 * ppl,
        "{ppl} vs {}",
        v["ppl"]
    );
    std::fs::remove_file(&t).ok();

    let v = run(&["bench", m, "-p", "16", "-n", "4", "-r", "2", "--json"]);
    for k in [
        "pp",
        "tg",
        "pp_samples",
        "tg_samples",
        "n_prompt",
        "n_gen",
        "threads",
        "budget",
        "bytes_per_token",
        "params_total",
        "params_active",
    ] {
        assert!(!v[k].is_null(), "bench --json lacks {k}");
    }
    assert!(v["pp"].as_f64().unwrap() > 0.0 && v["tg"].as_f64().unwrap() > 0.0);
    assert_eq!(v["tg_samples"].as_array().unwrap().len(), 2);

    let v = run(&["info", m, "--json"]);
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["hidden"], 64);
    assert_eq!(v["budgets"].as_array().unwrap().len(), 0);
    assert_eq!(
        v["parent"]["params_total"].as_u64().unwrap(),
        256 * 64 + 64 + 3 * (64 + 64 + 4 * 16 * 64 * 2 + 2 * 16 * 64 * 2 + 3 * 96 * 64)
    );

    let v = run(&["run", m, "-p", "hello", "-n", "5", "--ignore-eos", "--json"]);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(v["stop_reason"], "length");
    assert_eq!(v["prompt_tokens"], 5);
}

#[test]
fn gen_data_writes_seeded_jsonl() {
    let d = fixture("llama_tiny");
    let dir = std::env::temp_dir().join(format!("elastica-gd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("p.txt");
    std::fs::write(&prompts, "hello there\n\nsecond prompt\n").unwrap();
    let sample = |out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
            .args([
                "gen-data",
                d.to_str().unwrap(),
                "--prompts",
                prompts.to_str().unwrap(),
                "-n",
                "3",
                "--max-tokens",
                "8",
                "--seed",
                "5",
                "--force",
                "--out",
            ])
            .arg(dir.join(out))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(dir.join(out)).unwrap()
    };
    let a = sample("a.jsonl");
    assert_eq!(a, sample("b.jsonl"), "same seed, same samples");
    let lines: Vec<Value> = a
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["prompt"], "second prompt");
    assert!(
        lines[2]["text"]
            .as_str()
            .unwrap()
            .starts_with("hello there")
    );
    // Refusals: no prompts, an existing output.
    std::fs::write(&prompts, " \n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args([
            "gen-data",
            d.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
        ])
        .arg(dir.join("c.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no text"));
    let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args([
            "gen-data",
            d.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
        ])
        .arg(dir.join("a.jsonl"))
        .output()
        .unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--force"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn threads_capped_at_logical_cpus() {
    // More threads than CPUs used to spin the pool into a crawl; now they are capped, with a warning.
    let d = fixture("llama_tiny");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args([
            "bench",
            d.to_str().unwrap(),
            "-t",
            "1000",
            "-p",
            "8",
            "-n",
            "4",
            "-r",
            "1",
        ])
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("--threads 1000") && err.contains("logical CPUs"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"].as_u64().unwrap() as usize, cpus);
    // The default is the physical cores, never more than the CPUs.
    let v = run(&[
        "bench",
        d.to_str().unwrap(),
        "-p",
        "8",
        "-n",
        "4",
        "-r",
        "1",
        "--json",
    ]);
    let t = v["threads"].as_u64().unwrap() as usize;
    assert!((1..=cpus).contains(&t), "{t}");
}

fn elastica(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn run_prompt_file_zero_tokens_and_stop_words() {
    let d = fixture("llama_tiny");
    let m = d.to_str().unwrap();
    // -n 0 processes the prompt and generates nothing.
    let v = run(&["run", m, "-p", "hello", "-n", "0", "--json"]);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 0);
    assert_eq!(v["text"], "");
    assert_eq!(v["stop_reason"], "length");
    // -f reads the prompt from a file: the same generation as -p.
    let dir = std::env::temp_dir().join(format!("elastica-f-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("prompt.txt");
    std::fs::write(&p, "hello there").unwrap();
    let a = run(&["run", m, "-p", "hello there", "-n", "4", "--json"]);
    let b = run(&["run", m, "-f", p.to_str().unwrap(), "-n", "4", "--json"]);
    assert_eq!(a["tokens"], b["tokens"]);
    assert_eq!(b["prompt_tokens"], 11);
    // A missing or non-UTF-8 prompt file is named; -p and -f together are refused.
    let missing = dir.join("none.txt");
    let o = elastica(&["run", m, "-f", missing.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("none.txt"));
    let bin = dir.join("bin.txt");
    std::fs::write(&bin, [0x68u8, 0xff, 0xfe]).unwrap();
    let o = elastica(&["run", m, "-f", bin.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bin.txt") && err.contains("UTF-8"),
        "{err}"
    );
    let o = elastica(&["run", m, "-f", p.to_str().unwrap(), "-p", "x"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used"));
    // The stats line says why generation stopped in words (--json keeps snake_case names).
    let o = elastica(&["run", m, "-p", "hello", "-n", "3", "--ignore-eos"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stop: max tokens,"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(p: &std::path::Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(&b[1..4], b"PNG");
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn importance_plot_draws_the_models_axes() {
    let dir = std::env::temp_dir().join(format!("elastica-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let calib = fixture("text/gpl-3.txt");
    // (fixture, panels): llama = hidden, depth, FFN, heads; the hybrid MoE (no dense FFN) adds
    // expert, shared-expert and Mamba head channels, Mamba heads and routed experts.
    for (name, cols, rows) in [("llama_tiny", 2, 2), ("nemotron_h_moe", 3, 3)] {
        let png = dir.join(format!("{name}.png"));
        let o = elastica(&[
            "rank",
            fixture(name).to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
            "--samples",
            "2",
            "--seq",
            "32",
            "--depth",
            "oneshot",
            "--depth-samples",
            "1",
            "--depth-seq",
            "16",
            "--out",
            dir.join(format!("{name}.json")).to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(png_size(&png), (500 * cols, 420 * rows), "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `run --prompts FILE.jsonl`: one JSON line per prompt, carrying its id, each the generation the
/// prompt gets alone (system message included); `--no-thinking` renders the template with
/// `enable_thinking` false; bad lines are named by file and line, and nothing is generated.
#[test]
fn run_many_prompts_from_jsonl() {
    let m = fixture("llama_tiny");
    let m = m.to_str().unwrap();
    let tpl = fixture("templates/chatml-think.jinja");
    let tpl = tpl.to_str().unwrap();
    let dir = std::env::temp_dir().join(format!("elastica-prompts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("p.jsonl");
    std::fs::write(
        &p,
        "{\"id\": \"a\", \"prompt\": \"hello\"}\n\n{\"id\": 7, \"prompt\": \"hi there\", \"system\": \"be brief\"}\n",
    )
    .unwrap();
    let chat = ["--chat", "--chat-template", tpl, "-n", "5", "--ignore-eos"];
    let o = elastica(&[&["run", m, "--prompts", p.to_str().unwrap()][..], &chat].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (&lines[0]["id"], &lines[1]["id"]),
        (&Value::from("a"), &Value::from(7))
    );
    let alone = run(&[&["run", m, "-p", "hello", "--json"][..], &chat].concat());
    assert_eq!(lines[0]["tokens"], alone["tokens"]);
    let alone = run(&[
        &["run", m, "-p", "hi there", "--system", "be brief", "--json"][..],
        &chat,
    ]
    .concat());
    assert_eq!(lines[1]["tokens"], alone["tokens"]);
    assert_eq!(lines[1]["prompt_tokens"], alone["prompt_tokens"]);
    assert!(lines[0]["seconds"].as_f64().unwrap() > 0.0);
    // Thinking off: the template's empty reasoning block closes the one the prompt would open;
    // the same as the rendered text given raw.
    let off = run(&[
        &["run", m, "-p", "hello", "--json", "--no-thinking"][..],
        &chat,
    ]
    .concat());
    let text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n";
    let raw = run(&["run", m, "-p", text, "--json", "-n", "5", "--ignore-eos"]);
    assert_eq!(off["prompt_tokens"], raw["prompt_tokens"]);
    assert_eq!(off["tokens"], raw["tokens"]);
    let o = elastica(&["run", m, "-p", "hello", "--no-thinking"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--chat"));
    // Bad files: the line is named and nothing runs.
    for (text, want) in [
        ("{\"prompt\": \"ok\"}\nnot json\n", "p.jsonl:2: not JSON"),
        ("{\"prompt\": 3}\n", "\"prompt\" is 3, not a string"),
        ("{\"id\": 1}\n", "p.jsonl:1: no \"prompt\" string"),
        ("\n\n", "no prompts"),
    ] {
        std::fs::write(&p, text).unwrap();
        let o = elastica(&["run", m, "--prompts", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{text:?}: {err}");
        assert!(o.stdout.is_empty(), "{text:?}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
