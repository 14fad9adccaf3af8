//! Elastify and slice: importance ranking, re-ordering invariance, the budget solver's
//! constraints, slice == view for every axis, interoperability with transformers, refusals.

mod common;
use common::*;
use elastica::budget::Axis;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn exe() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elastica"))
}

fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{:?}: {}",
        c,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn fails(c: &mut Command, needles: &[&str]) {
    let o = c.output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{c:?} succeeded");
    assert!(!e.contains("panicked"), "{e}");
    for n in needles {
        assert!(e.contains(n), "{n:?} not in {e:?}");
    }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-el-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn calib() -> PathBuf {
    fixture("text/gpl-3.txt")
}

/// A small, fast ranking of a fixture.
fn rank(model: &Path, imp: &Path) {
    ok(exe().args([
        "rank",
        s(model),
        "--calib",
        s(&calib()),
        "--samples",
        "6",
        "--seq",
        "48",
        "--depth",
        "oneshot",
        "--depth-samples",
        "1",
        "--depth-seq",
        "24",
        "--out",
        s(imp),
        "--force",
    ]));
}

/// rank + elastify a fixture (HF folder or GGUF file); returns (importance, elastic output).
fn elastify(model: &Path, dir: &Path, ext: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let imp = dir.join("importance.json");
    let out = dir.join(format!("elastic{ext}"));
    rank(model, &imp);
    let mut c = exe();
    c.args([
        "elastify",
        s(model),
        "--importance",
        s(&imp),
        "--budgets",
        "full,0.75,0.5",
        "--out",
        s(&out),
        "--force",
        "--json",
    ])
    .args(extra);
    ok(&mut c);
    (imp, out)
}

#[test]
fn reordering_keeps_the_function() {
    for (name, file, ext) in [
        ("nemotron_h_moe", "", ""),
        ("nemotron_h_moe", "model-f32.gguf", ".gguf"),
        ("nemotron_h_dense", "", ""),
        ("llama_tiny", "", ""),
    ] {
        let dir = tmp(&format!("inv-{name}{ext}"));
        let src = if file.is_empty() {
            fixture(name)
        } else {
            fixture(name).join(file)
        };
        for order in ["importance", "random"] {
            let (_, out) = elastify(&src, &dir, ext, &["--order", order, "--seed", "3"]);
            let r = reference(name);
            let d = rel_diff(&logits_all(&load(&out), &r.tokens, "full"), &r.logits);
            assert!(d < 1e-4, "{name}{ext} {order}: {d}");
            // The re-ordering really moved things: the same explicit small budget differs.
            let small = "hidden=48,heads=2";
            let a = logits_all(&load(&src), &r.tokens, small);
            let b = logits_all(&load(&out), &r.tokens, small);
            assert!(
                rel_diff(&a, &b) > 1e-4,
                "{name}{ext} {order}: re-ordering changed nothing"
            );
        }
    }
}

#[test]
fn solver_constraints_and_manifest() {
    let dir = tmp("solver");
    let src = fixture("nemotron_h_moe");
    let imp = dir.join("importance.json");
    rank(&src, &imp);
    let out = dir.join("el");
    let v: Value = serde_json::from_str(&ok(exe().args([
        "elastify",
        s(&src),
        "--importance",
        s(&imp),
        "--budgets",
        "a=1.0,b=0.8,c=params:150000,d=active:0.5,e=0.35",
        "--out",
        s(&out),
        "--force",
        "--json",
        "--axes",
        "hidden,moe_ffn,experts,shared_ffn,heads,mamba_heads,mamba_head_dim,depth",
    ])))
    .unwrap();
    let m = load(&out);
    let (pt, pa) = m.params(&m.full_budget());
    let budgets = v["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 5);
    let limits = [
        pt as f64,
        0.8 * pt as f64,
        150000.0,
        0.5 * pa as f64,
        0.35 * pt as f64,
    ];
    let active = [false, false, false, true, false];
    let mut prev: Option<elastica::Budget> = None;
    for b in budgets {
        // Written largest first; mixed total/active targets may swap places.
        let i = ["a", "b", "c", "d", "e"]
            .iter()
            .position(|n| b["name"] == *n)
            .unwrap();
        let bud = m.budget(b["name"].as_str().unwrap()).unwrap();
        let (t, a) = m.params(&bud);
        let n = if active[i] { a } else { t } as f64;
        assert!(n <= limits[i] + 0.5, "{}: {n} > {}", b["name"], limits[i]);
        assert!(
            n >= 0.5 * limits[i],
            "{}: {n} far below {}",
            b["name"],
            limits[i]
        );
        assert!(bud.hidden.is_multiple_of(16));
        for (l, lb) in bud.layers.iter().enumerate() {
            let k = m.shape.layers[l];
            use elastica::budget::LayerKind::*;
            match k {
                Moe => {
                    assert!(lb.size(Axis::MoeFfn) % 16 == 0 && lb.size(Axis::SharedFfn) % 16 == 0);
                    assert!(
                        lb.size(Axis::Experts) % m.shape.expert_groups == 0
                            && lb.size(Axis::Experts) >= m.shape.experts_per_tok
                    );
                }
                Attention => assert!(lb.size(Axis::Heads) % m.shape.kv_heads == 0),
                Mamba => assert!(lb.size(Axis::MambaHeads) % m.shape.mamba_groups == 0),
                _ => {}
            }
        }
        if let Some(p) = &prev {
            assert!(
                bud.nested_in(p),
                "{} is not nested in the previous budget",
                b["name"]
            );
        }
        prev = Some(bud);
    }
    // The manifest carries the depth order, and info lists every budget.
    let info: Value = serde_json::from_str(&ok(exe().args(["info", s(&out), "--json"]))).unwrap();
    assert_eq!(info["budgets"].as_array().unwrap().len(), 5);
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["elastic"]["layer_order"].as_array().unwrap().len(), 8);
    // Refusals: impossible target, unknown axis.
    fails(
        exe().args([
            "elastify",
            s(&src),
            "--importance",
            s(&imp),
            "--budgets",
            "0.01",
            "--axes",
            "heads",
            "--out",
            s(&dir.join("x")),
            "--force",
        ]),
        &["cannot be met"],
    );
    fails(
        exe().args([
            "elastify",
            s(&src),
            "--importance",
            s(&imp),
            "--budgets",
            "0.5",
            "--axes",
            "colour",
            "--out",
            s(&dir.join("x")),
            "--force",
        ]),
        &["unknown axis"],
    );
    fails(
        exe().args([
            "elastify",
            s(&src),
            "--importance",
            s(&imp),
            "--budgets",
            "0.5,x=zz",
            "--out",
            s(&dir.join("x")),
            "--force",
        ]),
        &["\"zz\""],
    );
    assert!(!dir.join("x").exists());
}

/// Every axis of the elastic checkpoint: `slice` output == the budget view, for HF and GGUF.
#[test]
fn slices_equal_views_for_every_axis() {
    for (name, file, ext, specs) in [
        (
            "nemotron_h_dense",
            "",
            "",
            vec![
                "hidden=32",
                "ffn=48",
                "heads=2",
                "mamba_heads=4",
                "mamba_head_dim=8",
                "skip=2+5",
                "0.5",
            ],
        ),
        (
            "nemotron_h_moe",
            "",
            "",
            vec![
                "experts=4",
                "moe_ffn=16",
                "shared_ffn=24",
                "hidden=32,experts=6,mamba_heads=6,heads=2,skip=4",
                "0.75",
            ],
        ),
        (
            "nemotron_h_moe",
            "model-f32.gguf",
            ".gguf",
            vec![
                "experts=4",
                "moe_ffn=16",
                "shared_ffn=24",
                "hidden=32,mamba_head_dim=8,skip=0+4",
                "0.5",
            ],
        ),
        (
            "llama_tiny",
            "",
            "",
            vec!["hidden=32", "ffn=48", "heads=2", "skip=1", "0.5"],
        ),
    ] {
        let dir = tmp(&format!("slice-{name}{ext}"));
        let src = if file.is_empty() {
            fixture(name)
        } else {
            fixture(name).join(file)
        };
        let (_, el) = elastify(&src, &dir, ext, &[]);
        let parent = load(&el);
        let r = reference(name);
        for spec in specs {
            let out = dir.join(format!("slice{ext}"));
            ok(exe().args([
                "slice",
                s(&el),
                "--budget",
                spec,
                "--out",
                s(&out),
                "--force",
                "--verify",
            ]));
            let sliced = load(&out);
            let view = logits_all(&parent, &r.tokens, spec);
            let phys = logits_all(&sliced, &r.tokens, "full");
            assert!(rel_diff(&view, &phys) < 1e-6, "{name}{ext} [{spec}]");
            assert_eq!(
                parent.params(&parent.budget(spec).unwrap()),
                sliced.params(&sliced.full_budget())
            );
        }
    }
}

/// Slices load in the tools users run and give the logits elastica gives there: transformers for
/// HF outputs, llama.cpp for GGUF outputs, including HF <-> GGUF conversion (fixtures recorded by
/// tools/ref/check_slices.py).
#[test]
fn slices_load_in_transformers_and_llama_cpp() {
    let cases: Vec<PathBuf> = std::fs::read_dir(fixture("slices"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(cases.len() >= 7);
    for case in cases {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&case).unwrap()).unwrap();
        let dir = tmp(&format!(
            "interop-{}",
            case.file_stem().unwrap().to_string_lossy()
        ));
        let fmt = v["format"].as_str().unwrap();
        let out = dir.join(if fmt == "hf" { "slice" } else { "slice.gguf" });
        let mut src = fixture(v["fixture"].as_str().unwrap());
        if let Some(f) = v["file"].as_str().filter(|f| !f.is_empty()) {
            src = src.join(f);
        }
        ok(exe().args([
            "slice",
            s(&src),
            "--budget",
            v["budget"].as_str().unwrap(),
            "--out",
            s(&out),
            "--format",
            fmt,
            "--verify",
        ]));
        let Reference {
            tokens,
            logits: want,
        } = parse_reference(&v);
        let d = rel_diff(&logits_all(&load(&out), &tokens, "full"), &want);
        assert!(d < 1e-4, "{}: {d} against {}", case.display(), v["engine"]);
    }
}

/// HF -> GGUF -> HF round trip: the same function at every step.
#[test]
fn format_conversion_round_trip() {
    for name in ["nemotron_h_moe", "nemotron_h_dense", "llama_tiny"] {
        let dir = tmp(&format!("rt-{name}"));
        let (g, h) = (dir.join("a.gguf"), dir.join("b"));
        let spec = "hidden=48,heads=2";
        ok(exe().args([
            "slice",
            s(&fixture(name)),
            "--budget",
            spec,
            "--out",
            s(&g),
            "--format",
            "gguf",
        ]));
        ok(exe().args([
            "slice",
            s(&g),
            "--budget",
            "full",
            "--out",
            s(&h),
            "--format",
            "hf",
        ]));
        let r = reference(name);
        let view = logits_all(&load(&fixture(name)), &r.tokens, spec);
        for p in [&g, &h] {
            let d = rel_diff(&logits_all(&load(p), &r.tokens, "full"), &view);
            assert!(d < 1e-5, "{name} via {}: {d}", p.display());
        }
        // The tokenizer survives: HF -> GGUF metadata -> tokenizer.json.
        assert!(h.join("tokenizer.json").exists() && h.join("tokenizer_config.json").exists());
    }
}

#[test]
fn refusals_and_atomic_writes() {
    let dir = tmp("refuse");
    let dense = fixture("nemotron_h_dense");
    let moe = fixture("nemotron_h_moe");
    let (imp, el) = elastify(&dense, &dir, "", &[]);
    // Importance from another model.
    fails(
        exe().args([
            "elastify",
            s(&moe),
            "--importance",
            s(&imp),
            "--budgets",
            "0.5",
            "--out",
            s(&dir.join("x")),
        ]),
        &["importance.json", "made for another model"],
    );
    // A corrupted importance file (order not a permutation).
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&imp).unwrap()).unwrap();
    v["hidden"]["order"][0] = v["hidden"]["order"][1].clone();
    let bad = dir.join("bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    fails(
        exe().args([
            "elastify",
            s(&dense),
            "--importance",
            s(&bad),
            "--budgets",
            "0.5",
            "--out",
            s(&dir.join("x")),
        ]),
        &["bad.json", "hidden", "permutation"],
    );
    std::fs::write(&bad, "{}").unwrap();
    fails(
        exe().args([
            "elastify",
            s(&dense),
            "--importance",
            s(&bad),
            "--budgets",
            "0.5",
            "--out",
            s(&dir.join("x")),
        ]),
        &["bad.json", "not an importance file"],
    );
    // Unknown budget name; existing output without --force.
    fails(
        exe().args([
            "slice",
            s(&el),
            "--budget",
            "nope",
            "--out",
            s(&dir.join("x")),
        ]),
        &["no budget named \"nope\""],
    );
    std::fs::create_dir_all(dir.join("exists")).unwrap();
    fails(
        exe().args([
            "slice",
            s(&el),
            "--budget",
            "0.5",
            "--out",
            s(&dir.join("exists")),
        ]),
        &["exists", "--force"],
    );
    fails(
        exe().args(["rank", s(&dense), "--calib", s(&calib()), "--out", s(&imp)]),
        &["exists"],
    );
    // An unknown output format is refused clearly.
    fails(
        exe().args([
            "slice",
            s(&el),
            "--budget",
            "0.5",
            "--out",
            s(&dir.join("x.gguf")),
            "--format",
            "onnx",
        ]),
        &["--format", "onnx"],
    );
    // A write that fails midway leaves nothing behind (failure injected at the 5th tensor).
    let out = dir.join("partial");
    fails(
        exe().env("ELASTICA_FAIL_AT_TENSOR", "5").args([
            "slice",
            s(&el),
            "--budget",
            "0.5",
            "--out",
            s(&out),
        ]),
        &["injected failure"],
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    // The same for a GGUF output.
    let g = dir.join("g.gguf");
    fails(
        exe().env("ELASTICA_FAIL_AT_TENSOR", "3").args([
            "slice",
            s(&moe.join("model-f32.gguf")),
            "--budget",
            "heads=2",
            "--out",
            s(&g),
        ]),
        &["injected failure"],
    );
    assert!(!g.exists());
    // Calibration data that is empty or not UTF-8.
    std::fs::write(dir.join("empty.txt"), "  \n").unwrap();
    fails(
        exe().args([
            "rank",
            s(&dense),
            "--calib",
            s(&dir.join("empty.txt")),
            "--out",
            s(&dir.join("i.json")),
        ]),
        &["empty.txt", "no text"],
    );
    std::fs::write(dir.join("bin.txt"), [0xff, 0xfe]).unwrap();
    fails(
        exe().args([
            "rank",
            s(&dense),
            "--calib",
            s(&dir.join("bin.txt")),
            "--out",
            s(&dir.join("i.json")),
        ]),
        &["bin.txt", "UTF-8"],
    );
}

/// The measured objective (`elastify --calib`): budgets still meet their targets and nest, and the
/// search runs on the re-ordered model (the written file carries the manifest).
#[test]
fn measured_solver() {
    let dir = tmp("measured");
    let src = fixture("nemotron_h_dense");
    let imp = dir.join("importance.json");
    ok(exe().args([
        "rank",
        s(&src),
        "--calib",
        s(&calib()),
        "--samples",
        "4",
        "--seq",
        "32",
        "--out",
        s(&imp),
    ]));
    let out = dir.join("el");
    let v: Value = serde_json::from_str(&ok(exe().args([
        "elastify",
        s(&src),
        "--importance",
        s(&imp),
        "--budgets",
        "full,0.7,0.45",
        "--calib",
        s(&calib()),
        "--solve-samples",
        "2",
        "--solve-seq",
        "32",
        "--out",
        s(&out),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["objective"], "logits");
    let m = load(&out);
    let (pt, _) = m.params(&m.full_budget());
    let b1 = m.budget("0.7").unwrap();
    let b2 = m.budget("0.45").unwrap();
    assert!(
        m.params(&b1).0 as f64 <= 0.7 * pt as f64 && m.params(&b2).0 as f64 <= 0.45 * pt as f64
    );
    assert!(b2.nested_in(&b1));
    // The re-ordered model is the parent's function.
    let r = reference("nemotron_h_dense");
    assert!(rel_diff(&logits_all(&m, &r.tokens, "full"), &r.logits) < 1e-4);
    // No staging files are left.
    assert!(
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".stage-"))
    );
}

/// The newcomer's flow: `elastify` without `--calib` runs the measured solver on the calibration
/// text `rank` recorded (absolute paths, so another working folder finds it); `--objective mass`
/// still reaches the importance-mass rule; a recorded file that is gone is a clear error.
#[test]
fn measured_solver_is_the_default() {
    let dir = tmp("default-obj");
    let src = fixture("nemotron_h_dense");
    // A relative --calib, from the fixture folder.
    let text = calib();
    let imp = dir.join("importance.json");
    ok(exe().current_dir(text.parent().unwrap()).args([
        "rank",
        s(&src),
        "--calib",
        text.file_name().unwrap().to_str().unwrap(),
        "--samples",
        "4",
        "--seq",
        "32",
        "--out",
        s(&imp),
    ]));
    let el = |extra: &[&str], imp: &Path| {
        let mut c = exe();
        c.args([
            "elastify",
            s(&src),
            "--importance",
            s(imp),
            "--budgets",
            "full,0.7",
            "--solve-samples",
            "2",
            "--solve-seq",
            "32",
            "--out",
            s(&dir.join("el")),
            "--force",
            "--json",
        ])
        .args(extra);
        c
    };
    let v: Value = serde_json::from_str(&ok(&mut el(&[], &imp))).unwrap();
    assert_eq!(v["objective"], "logits");
    assert_eq!(
        std::fs::canonicalize(v["calib"][0].as_str().unwrap()).unwrap(),
        std::fs::canonicalize(&text).unwrap()
    );
    let v: Value = serde_json::from_str(&ok(&mut el(&["--objective", "mass"], &imp))).unwrap();
    assert_eq!(v["objective"], "mass");
    fails(
        &mut el(&["--objective", "guess"], &imp),
        &["--objective", "guess"],
    );
    // The recorded text is gone: the error names the importance file, the text and --calib.
    let mut j: Value = serde_json::from_str(&std::fs::read_to_string(&imp).unwrap()).unwrap();
    j["calibration"]["files"] = serde_json::json!([s(&dir.join("gone.txt"))]);
    let moved = dir.join("moved.json");
    std::fs::write(&moved, j.to_string()).unwrap();
    fails(
        &mut el(&[], &moved),
        &["moved.json", "gone.txt", "--calib", "--objective mass"],
    );
    // --calib overrides it.
    let v: Value = serde_json::from_str(&ok(&mut el(&["--calib", s(&text)], &moved))).unwrap();
    assert_eq!(v["objective"], "logits");
}

/// Depth is ranked only when asked for. One-shot removal (one forward per layer) and iterative
/// removal agree where they must: the layer iterative removal drops first is the one whose
/// removal alone costs least, with the same score; one-shot's order follows its scores.
#[test]
fn depth_ranking_one_shot_and_iterative_agree() {
    let dir = tmp("depth");
    let src = fixture("nemotron_h_dense");
    let ranked = |depth: Option<&str>| -> Value {
        let imp = dir.join(format!("{}.json", depth.unwrap_or("none")));
        let mut c = exe();
        c.args(["rank", s(&src), "--calib", s(&calib()), "--samples", "3"]);
        c.args(["--seq", "32", "--depth-samples", "2", "--depth-seq", "24"]);
        if let Some(d) = depth {
            c.args(["--depth", d]);
        }
        ok(c.args(["--out", s(&imp)]));
        serde_json::from_str(&std::fs::read_to_string(&imp).unwrap()).unwrap()
    };
    let none = ranked(None);
    assert!(none.get("depth").is_none(), "{}", none["calibration"]);
    assert_eq!(none["calibration"]["depth"], "none");
    let scores = |v: &Value| -> (Vec<f64>, Vec<usize>) {
        let d = &v["depth"];
        let f = |k: &str| d[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap());
        (
            f("scores").collect(),
            f("order").map(|x| x as usize).collect(),
        )
    };
    let (one, one_order) = scores(&ranked(Some("oneshot")));
    let (it, it_order) = scores(&ranked(Some("iterative")));
    let n = one.len();
    assert!(n > 2);
    let mut by_score: Vec<usize> = (0..n).collect();
    by_score.sort_by(|&a, &b| one[b].total_cmp(&one[a]).then(a.cmp(&b)));
    assert_eq!(one_order, by_score);
    assert!(one.iter().all(|&x| x > 0.0 && x.is_finite()), "{one:?}");
    let first_dropped = *it_order.last().unwrap();
    assert_eq!(first_dropped, *one_order.last().unwrap(), "{one:?} {it:?}");
    assert_eq!(it[first_dropped], one[first_dropped]);
    // Different methods, different orders in general; both are permutations of the layers.
    let mut sorted = it_order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    fails(
        exe()
            .args([
                "rank",
                s(&src),
                "--calib",
                s(&calib()),
                "--depth",
                "oneshot",
            ])
            .args(["--depth-samples=0", "--out", s(&dir.join("x.json"))]),
        &["--depth-samples"],
    );
    assert!(!dir.join("x.json").exists());
    fails(
        exe()
            .args(["rank", s(&src), "--calib", s(&calib()), "--depth", "deep"])
            .args(["--out", s(&dir.join("x.json"))]),
        &["--depth", "deep", "oneshot"],
    );
    assert!(!dir.join("x.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without a terminal, long commands print progress lines (JSON lines with --json) on stderr.
#[test]
fn progress_without_a_terminal() {
    let dir = tmp("progress");
    let src = fixture("nemotron_h_dense");
    let imp = dir.join("importance.json");
    let run = |args: &[&str]| -> String {
        let o = exe()
            .env("ELASTICA_PROGRESS_SECS", "0")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stderr).unwrap()
    };
    let e = run(&[
        "rank",
        s(&src),
        "--calib",
        s(&calib()),
        "--samples",
        "4",
        "--seq",
        "32",
        "--depth",
        "oneshot",
        "--depth-samples",
        "1",
        "--depth-seq",
        "16",
        "--out",
        s(&imp),
    ]);
    assert!(e.contains("rank: activations 1/"), "{e}");
    assert!(e.contains("rank: depth"), "{e}");
    let out = dir.join("el");
    let e = run(&[
        "elastify",
        s(&src),
        "--importance",
        s(&imp),
        "--budgets",
        "full,0.7",
        "--solve-samples",
        "2",
        "--solve-seq",
        "32",
        "--out",
        s(&out),
    ]);
    assert!(e.contains("elastify: write "), "{e}");
    assert!(
        e.contains("elastify: solve ") && e.contains("evaluations"),
        "{e}"
    );
    // JSON lines: every stderr line is an object, the progress ones name command and stage.
    let e = run(&[
        "slice",
        s(&out),
        "--budget",
        "0.7",
        "--out",
        s(&dir.join("s")),
        "--json",
    ]);
    let lines: Vec<Value> = e
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect();
    assert!(
        lines.iter().any(|v| v["progress"] == "slice"
            && v["stage"] == "write"
            && v["total"].as_u64() > Some(0)),
        "{e}"
    );
    let e = run(&[
        "perplexity",
        s(&out),
        "--file",
        s(&calib()),
        "--ctx",
        "32",
        "--chunks",
        "2",
    ]);
    assert!(e.contains("perplexity: score 1/2 chunks"), "{e}");
}

/// A quantized input gives a quantized elastic file (re-quantized after re-ordering): its
/// matrices, and those of its budget slices, stay in the input's block format, and the logit
/// change against the input is reported.
#[test]
fn quantized_input_stays_quantized() {
    let dir = tmp("requant");
    let f32_gguf = fixture("nemotron_h_dense").join("model-f32.gguf");
    for dt in ["q4_1", "q8_0"] {
        let q = dir.join(format!("{dt}.gguf"));
        ok(exe().args([
            "slice",
            s(&f32_gguf),
            "--budget",
            "full",
            "--dtype",
            dt,
            "--out",
            s(&q),
            "--force",
        ]));
        let want = dt.to_uppercase();
        let dtypes = |p: &Path| -> Vec<String> {
            let m = load(p);
            m.matrices()
                .iter()
                .map(|t| t.dtype.name().to_string())
                .collect()
        };
        assert!(dtypes(&q).iter().all(|d| *d == want), "{:?}", dtypes(&q));
        let imp = dir.join("importance.json");
        rank(&q, &imp);
        let el = dir.join(format!("el-{dt}.gguf"));
        let v: Value = serde_json::from_str(&ok(exe().args([
            "elastify",
            s(&q),
            "--importance",
            s(&imp),
            "--budgets",
            "full,0.6",
            "--solve-samples",
            "2",
            "--solve-seq",
            "32",
            "--out",
            s(&el),
            "--force",
            "--json",
        ])))
        .unwrap();
        assert_eq!(v["requantized"], true);
        let d = &v["logit_diff"];
        assert!(
            d["rms_rel"].as_f64().unwrap() > 0.0 && d["rms_rel"].as_f64().unwrap() < 0.5,
            "{d}"
        );
        assert!(
            dtypes(&el).iter().all(|d| *d == want),
            "{dt}: {:?}",
            dtypes(&el)
        );
        // Not bigger than the input.
        let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
        assert!(size(&el) < 1.05 * size(&q), "{} vs {}", size(&el), size(&q));
        // A budget slice of it is quantized too, and equals the budget view.
        let sl = dir.join(format!("s-{dt}.gguf"));
        ok(exe().args([
            "slice",
            s(&el),
            "--budget",
            "0.6",
            "--out",
            s(&sl),
            "--verify",
            "--force",
        ]));
        assert!(dtypes(&sl).iter().all(|d| *d == want), "{:?}", dtypes(&sl));
        assert!(size(&sl) < size(&el));
        // --dtype still chooses a float format.
        let fl = dir.join(format!("f-{dt}.gguf"));
        let v: Value = serde_json::from_str(&ok(exe().args([
            "elastify",
            s(&q),
            "--importance",
            s(&imp),
            "--budgets",
            "full",
            "--dtype",
            "f32",
            "--out",
            s(&fl),
            "--force",
            "--json",
        ])))
        .unwrap();
        assert_eq!(v["requantized"], false);
        assert!(v["max_logit_diff"].as_f64().unwrap() < 1e-4);
        assert!(dtypes(&fl).iter().any(|d| d == "F32"));
    }
}
