//! Nested training: the training graph against the engine, gradients against finite
//! differences, checkpoints and resume, refusals.
mod common;
use candle_core::{DType, Tensor as CT, Var};
use common::fixture;
use elastica::budget::Axis;
use elastica::train::masks::Masks;
use elastica::train::net::Net;
use elastica::{Cache, Logits};

const CASES: [(&str, &str, &str); 5] = [
    (
        "nemotron_h_dense",
        "",
        "hidden=48,ffn=64,heads=2,mamba_heads=4,mamba_head_dim=8",
    ),
    (
        "nemotron_h_dense",
        "model-f32.gguf",
        "hidden=40,ffn=32,heads=2,mamba_heads=6,mamba_head_dim=12",
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

fn open(name: &str, file: &str) -> elastica::models::Checkpoint {
    let p = if file.is_empty() {
        fixture(name)
    } else {
        fixture(name).join(file)
    };
    elastica::models::open(&p).unwrap()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + seed * 11 + 5) % 256)
        .collect()
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
                let got: Vec<f32> = net
                    .forward(&toks, nb, t, &masks)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let mut want = vec![];
                for s in toks.chunks(t) {
                    let mut c = Cache::new(m, 64);
                    want.extend_from_slice(m.forward(s, &b, &mut c, Logits::All).unwrap());
                }
                let rel = common::rel_diff(&[got], &[want]);
                eprintln!("{name} {file} {dt:?} {spec}: rel {rel:.2e}");
                assert!(rel < 2e-5, "{name} {file} {spec} {dt:?}: rel diff {}", rel);
            }
        }
    }
}

fn flat(t: &CT) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Sets element `i` of a var to `x`.
fn poke(v: &Var, i: usize, x: f64) {
    let mut d = flat(v.as_tensor());
    d[i] = x;
    let t = CT::from_vec(d, v.as_tensor().shape(), v.device()).unwrap();
    v.set(&t).unwrap();
}

/// Central finite differences against the analytic gradient, in f64, under *soft* router masks
/// (so masked norms, prefix masks and the router are all on the path): every trainable tensor of
/// every layer type (Mamba-2 incl. the scan, attention, MLP, MoE routing weights and experts,
/// norms, embedding) and every router weight. Loss = Σ logits ⊙ R + λ·budget loss.
#[test]
fn gradients_match_finite_differences() {
    use elastica::train::{loss, rng::Rng, router::Router};
    for (name, file, sub) in [CASES[0], CASES[2], CASES[4]] {
        let ck = open(name, file);
        let m = &ck.model;
        let net = Net::from_model(m, &ck.raw, DType::F64).unwrap();
        let budgets = vec![m.budget("full").unwrap(), m.budget(sub).unwrap()];
        let router = Router::new(&m.shape, &budgets, true, &mut Rng::new(3), DType::F64).unwrap();
        assert!(!router.axes.is_empty());
        let (nb, t) = (2, 19);
        let toks: Vec<u32> = (0..nb).flat_map(|s| tokens(t, s as u32 + 7)).collect();
        let mut r = Rng::new(9);
        let rw: Vec<f64> = (0..nb * t * m.vocab).map(|_| r.uniform() - 0.5).collect();
        let rw = CT::from_vec(rw, (nb * t, m.vocab), &candle_core::Device::Cpu).unwrap();
        let target = m.params(&budgets[1]).0 as f64;
        // The router's decision (the same noise every call), its masks and the budget loss.
        let decided = || {
            let dec = router
                .decide(1, 0.7, Some(&mut Rng::new(11)), false)
                .unwrap();
            let masks = router
                .masks(&dec, &budgets[1], &m.shape, DType::F64)
                .unwrap();
            let e = net
                .param_count(
                    &|axis, l| {
                        Ok(router.expected(&dec, axis, l)?.unwrap_or(CT::new(
                            budgets[1].size(axis, l) as f64,
                            &candle_core::Device::Cpu,
                        )?))
                    },
                    &|_| true,
                )
                .unwrap();
            (masks, loss::budget_loss(&e, target).unwrap())
        };
        let lossf = || -> CT {
            let (masks, bl) = decided();
            let logits = net.forward(&toks, nb, t, &masks).unwrap();
            ((logits * &rw).unwrap().sum_all().unwrap() + bl).unwrap()
        };
        let whole = lossf().backward().unwrap();
        let mut vars: Vec<(String, Var)> = net
            .params
            .iter()
            .filter(|p| p.trainable())
            .map(|p| (p.name.clone(), p.var.clone()))
            .collect();
        for (i, v) in router.vars().into_iter().enumerate() {
            vars.push((format!("router.{i}"), v.clone()));
        }
        // Training's backward (block by block over the tape) against the whole graph's.
        let grads = {
            let (masks, bl) = decided();
            let (_, tape) = net.tape(&toks, nb, t, &masks).unwrap();
            let vs: Vec<Var> = vars.iter().map(|v| v.1.clone()).collect();
            tape.backward(&rw, Some(&bl), &vs).unwrap()
        };
        for (pname, v) in &vars {
            let (a, b) = (grads.get(v.as_tensor()), whole.get(v.as_tensor()));
            assert_eq!(
                a.is_some(),
                b.is_some(),
                "{name} {pname}: gradient on one path only"
            );
            if let (Some(a), Some(b)) = (a, b) {
                for (i, (x, y)) in flat(a).iter().zip(flat(b)).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-9 * (1.0 + y.abs()),
                        "{name} {pname}[{i}]: tape {x} vs whole graph {y}"
                    );
                }
            }
        }
        let mut checked = 0;
        let mut worst = 0f64;
        let mut failures: Vec<String> = vec![];
        for (pname, v) in &vars {
            let g = grads
                .get(v.as_tensor())
                .map(flat)
                .unwrap_or_else(|| vec![0.0; v.as_tensor().elem_count()]);
            let orig = flat(v.as_tensor());
            // The largest-gradient element and two pseudo-random ones.
            let imax = (0..g.len())
                .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                .unwrap();
            for i in [imax, (imax * 7 + 3) % g.len(), (imax * 13 + 5) % g.len()] {
                let h = 1e-4 * orig[i].abs().max(1.0);
                poke(v, i, orig[i] + h);
                let lp: f64 = lossf().to_scalar().unwrap();
                poke(v, i, orig[i] - h);
                let lm: f64 = lossf().to_scalar().unwrap();
                poke(v, i, orig[i]);
                let fd = (lp - lm) / (2.0 * h);
                let err = (fd - g[i]).abs() / (1e-6 + fd.abs().max(g[i].abs()));
                if !(err < 2e-3 || (fd - g[i]).abs() < 1e-8) {
                    failures.push(format!(
                        "{name} {pname}[{i}]: analytic {} vs finite difference {fd}",
                        g[i]
                    ));
                }
                worst = worst.max(err.min((fd - g[i]).abs() * 1e8));
                checked += 1;
            }
        }
        eprintln!("{name}: {checked} gradient entries checked, worst relative error {worst:.2e}");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

/// The KD loss gradient (computed outside the graph) against finite differences.
#[test]
fn kd_gradient_matches_finite_differences() {
    let v = 7;
    let rows = 3;
    let s: Vec<f32> = (0..rows * v)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3)
        .collect();
    let t: Vec<f32> = (0..rows * v)
        .map(|i| ((i * 17 % 13) as f32 - 6.0) * 0.25)
        .collect();
    for temp in [1.0, 2.0] {
        let (l, g) = elastica::train::loss::kd(&s, &t, v, temp);
        assert!(l > 0.0);
        let (l_same, _) = elastica::train::loss::kd(&t, &t, v, temp);
        assert!(l_same.abs() < 1e-9, "KL(p||p) = {l_same}");
        for i in 0..rows * v {
            let h = 1e-2f32;
            let mut sp = s.clone();
            sp[i] += h;
            let mut sm = s.clone();
            sm[i] -= h;
            let fd = (elastica::train::loss::kd(&sp, &t, v, temp).0
                - elastica::train::loss::kd(&sm, &t, v, temp).0)
                / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 1e-4 * fd.abs().max(1e-2),
                "T={temp} [{i}]: {} vs {fd}",
                g[i]
            );
        }
    }
}

/// Straight-through hard decisions give exactly the hard masks of the chosen sizes, and the
/// learned-architecture spec resolves to a valid nested budget.
#[test]
fn hard_router_masks_equal_budget_masks() {
    use elastica::train::{rng::Rng, router::Router};
    let ck = open("nemotron_h_dense", "");
    let m = &ck.model;
    let budgets = vec![m.budget("full").unwrap(), m.budget(CASES[0].2).unwrap()];
    let router = Router::new(&m.shape, &budgets, false, &mut Rng::new(1), DType::F64).unwrap();
    router.warm_start(&budgets, 2000, 0.01, 0.99).unwrap();
    for (bi, budget) in budgets.iter().enumerate() {
        let spec = router.argmax_spec(bi, budget, &m.shape).unwrap();
        assert_eq!(
            spec,
            budget.spec(&m.shape),
            "warm start reproduces the manifest"
        );
        let dec = router.decide(bi, 0.05, None, true).unwrap();
        let got = router.masks(&dec, budget, &m.shape, DType::F64).unwrap();
        let want = Masks::hard(&m.shape, budget, DType::F64).unwrap();
        assert_eq!(flat(&got.hidden), flat(&want.hidden));
        for (a, b) in got.layers.iter().zip(&want.layers) {
            for (x, y) in [
                (a.axes[Axis::Ffn].clone(), b.axes[Axis::Ffn].clone()),
                (a.axes[Axis::Heads].clone(), b.axes[Axis::Heads].clone()),
                (a.inner().unwrap(), b.inner().unwrap()),
            ] {
                assert_eq!(x.as_ref().map(flat), y.as_ref().map(flat));
            }
        }
    }
}

/// One parameter count: the engine's (plain sizes) and the training graph's (sizes as tensors)
/// agree under every budget, and under the full budget equal the student's weights, element by
/// element; an all-f32 model reads 4 bytes per active weight, one embedding row per token.
#[test]
fn one_parameter_count_for_engine_and_training() {
    use elastica::model::Mixer;
    for (name, file, sub) in CASES {
        let ck = open(name, file);
        let m = &ck.model;
        let net = Net::from_model(m, &ck.raw, DType::F64).unwrap();
        for spec in ["full", sub] {
            let b = m.budget(spec).unwrap();
            let size = |a: elastica::shape::Axis, l| {
                Ok(CT::new(b.size(a, l) as f64, &candle_core::Device::Cpu)?)
            };
            let keep = |l: usize| b.layer(l).keep;
            let got: f64 = net.param_count(&size, &keep).unwrap().to_scalar().unwrap();
            assert_eq!(got, m.params(&b).0 as f64, "{name} {file} {spec}");
        }
        let full = m.full_budget();
        let (total, active) = m.params(&full);
        // Correction biases are statistics, held by the engine but not trained.
        let stats: usize = m
            .blocks
            .iter()
            .map(|b| match &b.mixer {
                Mixer::Moe(x) => x.bias.len(),
                _ => 0,
            })
            .sum();
        let weights: usize = net
            .params
            .iter()
            .map(|p| p.var.as_tensor().elem_count())
            .sum();
        assert_eq!(total, (weights + stats) as u64, "{name} {file}");
        if m.matrices()
            .iter()
            .all(|t| t.dtype == elastica::tensor::DType::F32)
        {
            let rows = if m.lm_head.is_some() { m.vocab - 1 } else { 0 };
            let want = 4 * (active - (rows * m.shape.hidden) as u64);
            assert_eq!(m.bytes_per_token(&full), want, "{name} {file}");
        }
    }
}

/// The training forward routes with the engine's function: on scores with ties (zero router
/// weights, so every score is 0.5, and equal correction biases), at the group and the expert
/// level, both pick the same experts and so give the same logits.
#[test]
fn routing_ties_agree_with_engine() {
    use elastica::model::Mixer;
    for (name, file, sub) in [CASES[2], CASES[3]] {
        let mut ck = open(name, file);
        for b in &mut ck.model.blocks {
            if let Mixer::Moe(x) = &mut b.mixer {
                x.router.data.fill(0.0);
                let e = x.bias.len();
                x.bias.data = (0..e).map(|i| if i % 5 == 0 { 0.0 } else { 0.5 }).collect();
            }
        }
        let m = &ck.model;
        let net = Net::from_model(m, &ck.raw, DType::F32).unwrap();
        for spec in ["full", sub] {
            let b = m.budget(spec).unwrap();
            let masks = Masks::hard(&m.shape, &b, DType::F32).unwrap();
            let toks = tokens(23, 3);
            let got: Vec<f32> = net
                .forward(&toks, 1, 23, &masks)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want = common::logits_all(m, &toks, spec).concat();
            let rel = common::rel_diff(&[got], &[want]);
            assert!(rel < 2e-5, "{name} {file} {spec}: rel diff {rel}");
        }
    }
}

// ---- the `train` command on a tiny elastic model ----

fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_elastica"))
}

const SMALL: &str = "hidden=48,ffn=64,heads=2,mamba_heads=4,mamba_head_dim=8";

/// A copy of the dense Nemotron-H fixture with a two-budget manifest, in a fresh temp dir.
fn elastic_fixture(tag: &str, budgets: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("elastica-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("nemotron_h_dense").join(f), m.join(f)).unwrap();
    }
    let bs: Vec<serde_json::Value> = budgets
        .iter()
        .map(|(n, s)| serde_json::json!({"name": n, "spec": s}))
        .collect();
    let man = serde_json::json!({"format": "elastica.manifest/1", "parent": "hidden=64,ffn=96,heads=4,mamba_heads=8,mamba_head_dim=16", "budgets": bs});
    std::fs::write(m.join("elastic.json"), man.to_string()).unwrap();
    dir
}

fn train_args(dir: &std::path::Path, out: &str) -> Vec<String> {
    let s = |x: &str| x.to_string();
    vec![
        s("train"),
        dir.join("model").display().to_string(),
        s("--data"),
        fixture("text/gpl-3.txt").display().to_string(),
        s("--out"),
        dir.join(out).display().to_string(),
        s("--tokens"),
        s("768"),
        s("--seq"),
        s("32"),
        s("--batch"),
        s("2"),
        s("--seq2"),
        s("64"),
        s("--batch2"),
        s("1"),
        s("--stage1"),
        s("0.5"),
        s("--warmup"),
        s("2"),
        s("--lr"),
        s("1e-3"),
        s("--eval-every"),
        s("4"),
        s("--eval-seqs"),
        s("2"),
        s("--ckpt-every"),
        s("3"),
        s("--no-progress"),
        s("-t"),
        s("2"),
    ]
}

/// Log lines without the timing field.
fn log_lines(p: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tok_per_s");
            v
        })
        .collect()
}

/// A run stopped after a checkpoint and resumed writes the same log and the same model bytes as
/// an uninterrupted run; the trained model loads in the engine, its manifest holds the learned
/// budgets, and its masked forward (training graph) equals the engine's slice of the written file.
#[test]
fn resume_reproduces_the_run_and_output_is_an_elastic_checkpoint() {
    let dir = elastic_fixture("resume", &[("full", "full"), ("small", SMALL)]);
    let ok = |args: Vec<String>| {
        let o = bin().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    ok(train_args(&dir, "a"));
    let mut b = train_args(&dir, "b");
    b.extend(["--stop-after".to_string(), "5".to_string()]);
    ok(b);
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("b/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["step"], 3, "the last checkpoint before the stop");
    assert!(!dir.join("b/model").exists());
    let mut b = train_args(&dir, "b");
    b.push("--resume".into());
    ok(b);
    let (la, lb) = (
        log_lines(&dir.join("a/log.jsonl")),
        log_lines(&dir.join("b/log.jsonl")),
    );
    assert!(la.len() > 10);
    assert_eq!(la, lb, "resumed log differs");
    let wa = std::fs::read(dir.join("a/model/model.safetensors")).unwrap();
    let wb = std::fs::read(dir.join("b/model/model.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ");
    assert!(dir.join("a/curves.png").exists());
    // Model, curves and summary committed together; no temporary left in either run.
    for run in ["a", "b"] {
        let mut names: Vec<String> = std::fs::read_dir(dir.join(run))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "checkpoint",
                "curves.png",
                "log.jsonl",
                "model",
                "summary.json"
            ]
        );
    }

    // The output is an elastic checkpoint: trained weights differ from the input, the manifest
    // names both budgets, and the training graph on the written weights equals the engine.
    let ck = elastica::models::open(&dir.join("a/model")).unwrap();
    let m = &ck.model;
    let man = m.meta.manifest.as_ref().unwrap();
    assert_eq!(man.budgets.len(), 2);
    let orig = elastica::models::open(&dir.join("model")).unwrap();
    let toks = tokens(24, 3);
    let la = common::logits_all(m, &toks, "full");
    let lo = common::logits_all(&orig.model, &toks, "full");
    assert!(
        common::rel_diff(&la, &lo) > 1e-4,
        "training changed nothing"
    );
    let net = Net::from_model(m, &ck.raw, DType::F32).unwrap();
    for nb in &man.budgets {
        let b = m.budget(&nb.name).unwrap();
        let got: Vec<f32> = net
            .forward(
                &toks,
                1,
                24,
                &Masks::hard(&m.shape, &b, DType::F32).unwrap(),
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = common::logits_all(m, &toks, &nb.name).concat();
        let rel = common::rel_diff(&[got], &[want]);
        assert!(rel < 2e-5, "{}: masked vs engine {rel}", nb.name);
    }
    // run / perplexity / slice use it directly.
    let o = bin()
        .args([
            "perplexity",
            &dir.join("a/model").display().to_string(),
            "-f",
            &fixture("text/gpl-3.txt").display().to_string(),
            "--ctx",
            "64",
            "--chunks",
            "2",
            "--budget",
            "small",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = bin()
        .args([
            "slice",
            &dir.join("a/model").display().to_string(),
            "--budget",
            "small",
            "--out",
            &dir.join("small").display().to_string(),
            "--verify",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

fn refused(args: &[String], want: &str) {
    let o = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "accepted: {args:?}");
    assert!(
        err.contains(want),
        "error {err:?} does not mention {want:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_training_input_is_refused() {
    let dir = elastic_fixture("refuse", &[("full", "full"), ("small", SMALL)]);
    let with = |extra: &[&str], out: &str| -> Vec<String> {
        let mut a = train_args(&dir, out);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // Empty and non-UTF-8 data name the file.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let mut a = train_args(&dir, "x");
    let di = a.iter().position(|x| x == "--data").unwrap();
    a[di + 1] = empty.display().to_string();
    refused(&a, "empty.txt");
    let bin_file = dir.join("bytes.txt");
    std::fs::write(&bin_file, [0x66u8, 0xff, 0xfe, 0x00]).unwrap();
    a[di + 1] = bin_file.display().to_string();
    refused(&a, "not UTF-8");
    // Malformed options.
    let set = |flag: &str, v: &str| -> Vec<String> {
        let mut a = train_args(&dir, "x");
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v.into();
        a
    };
    refused(&with(&["--probs", "0.5,x"], "x"), "--probs");
    refused(&with(&["--schedule", "linear"], "x"), "--schedule");
    refused(&set("--seq", "0"), "--seq must be at least 1");
    refused(&with(&["--dtype", "q4"], "x"), "q4");
    // Budgets not in the manifest.
    refused(
        &with(&["--budgets", "full,tiny"], "x"),
        "no budget named \"tiny\"",
    );
    // A resume from another configuration.
    let o = bin()
        .args(with(&["--stop-after", "3"], "r"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut a = with(&["--resume"], "r");
    let si = a.iter().position(|x| x == "--seq").unwrap();
    a[si + 1] = "16".into();
    refused(&a, "another run configuration");
    // An existing run is not overwritten without --resume/--force.
    refused(&with(&[], "r"), "holds a run");
    // A non-finite loss stops with the step and budget named; the last good checkpoint stays.
    let mut a = with(&["--clip", "0"], "nan");
    for (flag, v) in [("--lr", "1e30"), ("--ckpt-every", "1")] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v.into();
    }
    let o = bin().args(&a).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not finite at step") && err.contains("budget"),
        "{err}"
    );
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("nan/checkpoint/state.json")).unwrap(),
    )
    .unwrap();
    assert!(st["step"].as_u64().unwrap() >= 1);
    // Budgets that are not nested are refused when the manifest is read.
    let bad = elastic_fixture(
        "nonnested",
        &[
            ("full", "full"),
            ("a", "hidden=48,ffn=96"),
            ("b", "hidden=56,ffn=64"),
        ],
    );
    refused(&train_args(&bad, "x"), "nest");
    let _ = std::fs::remove_dir_all(&bad);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A teacher with another vocabulary is refused.
#[test]
fn teacher_vocabulary_mismatch_is_refused() {
    let ck = open("nemotron_h_dense", "");
    let mut teacher = common::load(&fixture("llama_tiny"));
    teacher.vocab = 200;
    let b = vec![ck.model.budget("full").unwrap()];
    let cfg = elastica::train::Config {
        model: String::new(),
        budgets: vec!["full".into()],
        specs: vec![],
        data: String::new(),
        tokens: 64,
        seq: 8,
        batch: 1,
        seq2: 8,
        batch2: 1,
        stage1: 1.0,
        probs2: vec![1.0],
        lr: 1e-4,
        router_lr: 1e-2,
        warmup: 1,
        schedule: "constant".into(),
        weight_decay: 0.0,
        kd_temp: 1.0,
        budget_weight: 1.0,
        clip: 1.0,
        tau: (1.0, 0.05),
        hard: false,
        per_layer: false,
        router_init_p: 0.9,
        seed: 0,
        eval_every: 0,
        eval_seqs: 0,
        ckpt_every: 0,
        quant: None,
        quant_exclude: None,
        objective: elastica::train::Objective::Kd,
    };
    let e = elastica::train::Trainer::new(cfg, &ck, Some(&teacher), b, vec![1; 100], vec![])
        .err()
        .expect("refused");
    assert!(e.to_string().contains("vocabulary"), "{e}");
}

/// `init` writes every tensor the architecture reads with the reference initial values
/// (reproducibly from the seed); `train --objective lm` then learns the next token from scratch
/// and writes a model the engine loads; what does not apply is refused.
#[test]
fn from_scratch_init_and_next_token_training() {
    let dir = std::env::temp_dir().join(format!("elastica-train-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fx = fixture("nemotron_h_moe");
    let cfg = fx.join("config.json").display().to_string();
    let init = |out: &str, seed: &str| {
        bin()
            .args(["init", "--config", &cfg, "--tokenizer"])
            .arg(&fx)
            .arg("-o")
            .arg(dir.join(out))
            .args(["--seed", seed])
            .output()
            .unwrap()
    };
    for (out, seed) in [("a", "3"), ("b", "3"), ("c", "4")] {
        let o = init(out, seed);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let bytes = |d: &str| std::fs::read(dir.join(d).join("model.safetensors")).unwrap();
    assert_eq!(bytes("a"), bytes("b"), "same seed, same weights");
    assert_ne!(bytes("a"), bytes("c"), "another seed, other weights");
    let ck = elastica::models::open(&dir.join("a")).unwrap();
    let t = ck.raw.tensors();
    let vals = |n: &str| -> Vec<f32> {
        let b = t.get(n).unwrap().bytes();
        b.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    // Layer 0 is Mamba (pattern MEM*EMEE): A_log = log(1..=heads), D = 1, softplus(dt_bias) in
    // [time_step_min, time_step_max]; norms at one; linears N(0, 0.02²).
    let a = vals("backbone.layers.0.mixer.A_log");
    for (h, v) in a.iter().enumerate() {
        assert!((v - ((h + 1) as f32).ln()).abs() < 1e-6);
    }
    assert!(vals("backbone.layers.0.mixer.D").iter().all(|&v| v == 1.0));
    for b in vals("backbone.layers.0.mixer.dt_bias") {
        let dt = (b as f64).exp().ln_1p();
        assert!((0.99e-3..=0.101).contains(&dt), "{dt}");
    }
    assert!(vals("backbone.norm_f.weight").iter().all(|&v| v == 1.0));
    let w = vals("backbone.layers.0.mixer.in_proj.weight");
    let sd = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    assert!((sd - 0.02).abs() < 0.002, "{sd}");
    // Training from scratch: held-out perplexity falls well below the untrained model's.
    let out = dir.join("lm");
    let o = bin()
        .arg("train")
        .arg(dir.join("a"))
        .args(["--objective", "lm", "--data"])
        .arg(fixture("text/gpl-3.txt"))
        .arg("--out")
        .arg(&out)
        .args([
            "--tokens",
            "24576",
            "--seq",
            "64",
            "--batch",
            "4",
            "--stage1",
            "1",
            "--lr",
            "3e-3",
            "--warmup",
            "4",
            "--eval-every",
            "0",
            "--eval-seqs",
            "4",
            "--no-progress",
            "-t",
            "2",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let evals: Vec<f64> = log_lines(&out.join("log.jsonl"))
        .iter()
        .filter_map(|v| v["eval_ppl"]["full"].as_f64())
        .collect();
    let (first, last) = (evals[0], *evals.last().unwrap());
    assert!(last < first / 4.0, "held-out perplexity {first} → {last}");
    let m = elastica::models::load(&out.join("model")).unwrap();
    assert!(m.meta.manifest.is_none());
    // Refused: what the next-token objective does not take, an unknown objective, a vocabulary
    // smaller than the tokenizer's, an existing output, an architecture without a layout.
    let lm = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", &dir.join("a").display().to_string(), "--objective"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            "--data".into(),
            fixture("text/gpl-3.txt").display().to_string(),
        ]);
        v.extend(["--out".into(), dir.join("x").display().to_string()]);
        v
    };
    refused(&lm(&["lm", "--budgets", "full"]), "--objective lm");
    refused(&lm(&["lm", "--quant", "nvfp4"]), "--objective lm");
    refused(&lm(&["distill"]), "--objective \"distill\"");
    refused(&lm(&["kd"]), "no elastic manifest");
    let mut small: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("config.json")).unwrap()).unwrap();
    small["vocab_size"] = 100.into();
    let sc = dir.join("small.json");
    std::fs::write(&sc, small.to_string()).unwrap();
    let args = |c: &std::path::Path, out: &str| -> Vec<String> {
        let s = |p: &std::path::Path| p.display().to_string();
        vec![
            "init".into(),
            "--config".into(),
            s(c),
            "--tokenizer".into(),
            s(&fx),
            "-o".into(),
            s(&dir.join(out)),
        ]
    };
    refused(&args(&sc, "small"), "vocab_size");
    assert!(!dir.join("small").exists(), "nothing left behind");
    refused(&args(&fx.join("config.json"), "a"), "exists");
    refused(
        &args(&fixture("llama_tiny").join("config.json"), "llama"),
        "not supported",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
