//! FP8 and NVFP4 checkpoints (ModelOpt layout, llama.cpp's GGUF NVFP4): every budget of a
//! quantized elastic checkpoint slices into a quantized checkpoint of the same kind whose logits
//! equal the parent's budget view; the stored values match an independent dequantization with
//! ModelOpt's/vLLM's formulas; bad input is refused by name and leaves nothing behind.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Budgets of the dense Nemotron-H fixture whose cuts fall on 16-value blocks.
const DENSE: [(&str, &str); 2] = [
    ("half", "hidden=48,ffn=64,heads=2,mamba_heads=4"),
    ("small", "hidden=32,ffn=32,heads=2,mamba_heads=2"),
];
const MOE: [(&str, &str); 1] = [(
    "half",
    "hidden=48,moe_ffn=16,experts=4,shared_ffn=32,heads=2,mamba_heads=4",
)];

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-quant-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A copy of an HF fixture with a manifest of `budgets` (an elastic checkpoint).
fn elastic_copy(name: &str, dir: &Path, budgets: &[(&str, &str)]) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in std::fs::read_dir(fixture(name)).unwrap().flatten() {
        let n = f.file_name().into_string().unwrap();
        if n.ends_with(".json") && !n.starts_with("reference") || n == "model.safetensors" {
            std::fs::copy(f.path(), m.join(&n)).unwrap();
        }
    }
    let parent = load(&m).full_budget().spec(&load(&m).shape);
    let bs: Vec<serde_json::Value> = budgets
        .iter()
        .map(|(n, s)| serde_json::json!({"name": n, "spec": s}))
        .collect();
    let man = serde_json::json!({"format": "elastica.manifest/1", "parent": parent, "budgets": bs});
    std::fs::write(m.join("elastic.json"), man.to_string()).unwrap();
    m
}

fn quantize(model: &Path, to: &str, out: &Path, extra: &[&str]) -> (bool, String) {
    let calib = fixture("text/gpl-3.txt");
    let mut args = vec![
        "quantize",
        model.to_str().unwrap(),
        "--to",
        to,
        "--calib",
        calib.to_str().unwrap(),
        "--seq",
        "64",
        "--samples",
        "4",
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, _, err) = cli(&args);
    (ok, err)
}
/// `elastica slice SRC -b BUDGET [--dtype DT] -o OUT`: (success, stderr).
fn slice(src: &Path, budget: &str, dtype: Option<&str>, out: &Path) -> (bool, String) {
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["slice", s, "-b", budget, "-o", o];
    if let Some(d) = dtype {
        args.extend(["--dtype", d]);
    }
    let (ok, _, err) = cli(&args);
    (ok, err)
}

fn quant_algo(dir: &Path) -> String {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf_quant_config.json")).unwrap())
            .unwrap();
    v["quantization"]["quant_algo"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Dtypes of a safetensors file's tensors.
fn dtypes(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let b = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&b).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, format!("{:?}", v.dtype())))
        .collect()
}

/// RMS of the difference over RMS of `b` (top-k routing makes the max difference jumpy).
fn rms_rel(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        d += ((x - y) as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n).sqrt() as f32
}

#[test]
fn quantized_budgets_slice_to_the_parents_logits() {
    let dir = tmp("slice");
    let toks = reference("nemotron_h_dense").tokens;
    for (name, budgets) in [
        ("nemotron_h_dense", &DENSE[..]),
        ("nemotron_h_moe", &MOE[..]),
    ] {
        let m = elastic_copy(name, &dir, budgets);
        let float = load(&m);
        for (to, algo, weight, tol) in [
            ("fp8", "FP8", "F8_E4M3", 0.15),
            ("nvfp4", "NVFP4", "U8", 0.4),
        ] {
            let q = dir.join(format!("{name}-{to}"));
            let (ok, err) = quantize(&m, to, &q, &[]);
            assert!(ok, "{name} {to}: {err}");
            assert_eq!(quant_algo(&q), algo);
            let qm = load(&q);
            // Close to the float model it came from, not equal to it (the random MoE's top-k
            // routing flips under any rounding, so only the dense model gets the bound; SmolLM2's
            // perplexity is the real-model check).
            let d = rms_rel(
                &logits_all(&qm, &toks, "full"),
                &logits_all(&float, &toks, "full"),
            );
            println!("{name} {to}: full budget vs float, RMS {d:.3e}");
            assert!(d > 1e-6, "{name} {to}: quantization changed nothing");
            assert!(
                name != "nemotron_h_dense" || d < tol,
                "{name} {to}: quantized vs float {d}"
            );
            for (b, spec) in budgets {
                let s = dir.join(format!("{name}-{to}-{b}"));
                let (ok, err) = slice(&q, b, None, &s);
                assert!(ok, "{name} {to} {b}: {err}");
                // A quantized checkpoint of the same kind, cut to the budget.
                assert_eq!(quant_algo(&s), algo, "{name} {to} {b}");
                let dt = dtypes(&s);
                assert!(
                    dt.values().any(|d| d == weight),
                    "{name} {to} {b}: no {weight} weights"
                );
                let sm = load(&s);
                assert_eq!(
                    sm.full_budget().spec(&sm.shape),
                    qm.budget(spec).unwrap().spec(&qm.shape)
                );
                // Its logits are the parent's budget view, bit for bit.
                let view = logits_all(&qm, &toks, b);
                let phys = logits_all(&sm, &toks, "full");
                assert!(
                    view == phys,
                    "{name} {to} {b}: slice differs from the view by {}",
                    rel_diff(&phys, &view)
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stored_values_match_modelopt_dequantization() {
    let dir = tmp("ref");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/ref/modelopt_dequant.py");
    for (name, budgets) in [
        ("nemotron_h_dense", &DENSE[..]),
        ("nemotron_h_moe", &MOE[..]),
    ] {
        let m = elastic_copy(name, &dir, budgets);
        for to in ["fp8", "nvfp4"] {
            let q = dir.join(format!("{name}-{to}"));
            assert!(quantize(&m, to, &q, &[]).0);
            // elastica's dequantized values: the checkpoint written as F32.
            let f = dir.join(format!("{name}-{to}-f32"));
            let (ok, err) = slice(&q, "full", Some("f32"), &f);
            assert!(ok, "{err}");
            let out = std::process::Command::new("python3")
                .arg(&script)
                .args([&q, &f])
                .output()
                .unwrap_or_else(|e| panic!("python3 is needed for the reference check: {e}"));
            let so = String::from_utf8_lossy(&out.stdout);
            println!("{name} {to}: {so}");
            assert!(
                out.status.success(),
                "{name} {to}: {so}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gguf_nvfp4_agrees_with_hf_nvfp4() {
    let dir = tmp("gguf");
    let toks = reference("nemotron_h_dense").tokens;
    let g = fixture("nemotron_h_dense").join("model-f32.gguf");
    // GGUF's NVFP4 is made of 64-value blocks: ffn_down's 96 inputs do not fit.
    let bad = dir.join("bad.gguf");
    let (ok, err) = quantize(&g, "nvfp4", &bad, &[]);
    assert!(
        !ok && err.contains("ffn_down") && err.contains("64"),
        "{err}"
    );
    assert!(!bad.exists());
    // The same matrices quantized from the GGUF and the HF copy give the same model.
    let qg = dir.join("q.gguf");
    let (ok, err) = quantize(
        &g,
        "nvfp4",
        &qg,
        &["--exclude", "*attn*,*ssm*,*ffn_down*,output"],
    );
    assert!(ok, "{err}");
    let qh = dir.join("q-hf");
    let (ok, err) = quantize(
        &fixture("nemotron_h_dense"),
        "nvfp4",
        &qh,
        &[
            "--exclude",
            "*q_proj,*k_proj,*v_proj,*o_proj,*in_proj,*out_proj,*down_proj,lm_head",
        ],
    );
    assert!(ok, "{err}");
    let a = logits_all(&load(&qg), &toks, "full");
    let b = logits_all(&load(&qh), &toks, "full");
    let d = rel_diff(&a, &b);
    assert!(d < 1e-5, "GGUF NVFP4 vs HF NVFP4: {d}");
    // And it is not the float model.
    assert!(rel_diff(&a, &logits_all(&load(&g), &toks, "full")) > 1e-5);
    // Stacked routed experts (one GGUF tensor, one llama.cpp `.scale` value per expert) against
    // the HF layout's one tensor per expert.
    let mg = fixture("nemotron_h_moe").join("model-f32.gguf");
    let (qmg, qmh) = (dir.join("moe.gguf"), dir.join("moe-hf"));
    let (ok, err) = quantize(
        &mg,
        "nvfp4",
        &qmg,
        &["--exclude", "*attn*,*ssm*,*ffn_down*,output"],
    );
    assert!(ok, "{err}");
    let (ok, err) = quantize(
        &fixture("nemotron_h_moe"),
        "nvfp4",
        &qmh,
        &[
            "--exclude",
            "*q_proj,*k_proj,*v_proj,*o_proj,*in_proj,*out_proj,*down_proj,lm_head",
        ],
    );
    assert!(ok, "{err}");
    // Exact mode (f32 activations): int8 activation rounding would amplify the two layouts'
    // 1e-6 float differences.
    let mt = reference("nemotron_h_moe").tokens;
    let ex = [("ELASTICA_EXACT", "1")];
    let d = rel_diff(&logits_cli(&ex, &qmg, &mt), &logits_cli(&ex, &qmh, &mt));
    assert!(d < 1e-5, "MoE GGUF NVFP4 vs HF NVFP4: {d}");
    // FP8 has no GGUF type.
    let (ok, err) = quantize(&g, "fp8", &dir.join("f.gguf"), &[]);
    assert!(!ok && err.contains("FP8") && err.contains("GGUF"), "{err}");
    assert!(!dir.join("f.gguf").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Rewrites `dir`'s model.safetensors through `edit` (name, dtype, shape, bytes).
fn rewrite(
    dir: &Path,
    edit: impl Fn(
        &str,
        safetensors::Dtype,
        Vec<usize>,
        Vec<u8>,
    ) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    let p = dir.join("model.safetensors");
    let b = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&b).unwrap();
    let kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec()).map(|(d, s, x)| (n, d, s, x))
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = kept
        .iter()
        .map(|(n, d, s, x)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), x).unwrap(),
            )
        })
        .collect();
    std::fs::write(&p, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn quantize_refuses_bad_input_and_writes_nothing() {
    let dir = tmp("bad");
    let m = elastic_copy("nemotron_h_dense", &dir, &DENSE);
    let out = dir.join("out");
    let refused = |model: &Path, to: &str, extra: &[&str], want: &[&str]| {
        let (ok, err) = quantize(model, to, &out, extra);
        assert!(!ok, "accepted: {want:?}");
        for w in want {
            assert!(err.contains(w), "error lacks {w:?}: {err}");
        }
        assert!(!out.exists(), "left {} behind", out.display());
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.contains("out"))
            .collect();
        assert!(left.is_empty(), "temporaries left: {left:?}");
    };
    // An unknown target, a glob that does not parse, no calibration sequences.
    refused(&m, "int4", &[], &["--to", "int4"]);
    refused(
        &m,
        "nvfp4",
        &["--exclude", "*.up_proj,[q"],
        &["--exclude", "[q"],
    );
    refused(&m, "nvfp4", &["--samples", "0"], &["--samples"]);
    // QAD: an unknown format, and excludes without a format.
    let data = fixture("text/gpl-3.txt");
    let run = dir.join("out-run");
    for (extra, want) in [
        (&["--quant", "int4"][..], "int4"),
        (&["--quant-exclude", "*.up_proj"][..], "--quant"),
    ] {
        let mut args = vec![
            "train",
            m.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, err) = cli(&args);
        assert!(!ok && err.contains(want), "train {extra:?}: {err}");
        assert!(!run.join("model").exists());
    }
    // A budget whose cuts split NVFP4 blocks (Mamba heads cut to 8 of 16 channels).
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let m2 = elastic_copy(
        "nemotron_h_dense",
        &odd,
        &[("split", "hidden=48,ffn=64,mamba_heads=4,mamba_head_dim=8")],
    );
    refused(&m2, "nvfp4", &[], &["budget \"split\"", "blocks of 16"]);
    // Quantizing a quantized checkpoint.
    let q = dir.join("q");
    assert!(quantize(&m, "nvfp4", &q, &[]).0);
    refused(&q, "fp8", &[], &["already quantized", "NVFP4"]);
    // NaN and infinity in a weight.
    for (v, what) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let bad = dir.join(format!("nan-{what}"));
        std::fs::create_dir_all(&bad).unwrap();
        let bm = elastic_copy("nemotron_h_dense", &bad, &DENSE);
        rewrite(&bm, |n, d, s, mut x| {
            if n == "backbone.layers.2.mixer.up_proj.weight" {
                x[40..44].copy_from_slice(&v.to_le_bytes());
            }
            Some((d, s, x))
        });
        refused(
            &bm,
            "nvfp4",
            &[],
            &[
                "backbone.layers.2.mixer.up_proj.weight",
                what,
                "row 0, column 10",
            ],
        );
    }
    // Missing and mis-shaped scales are named when the checkpoint is read.
    let t = "backbone.layers.2.mixer.up_proj";
    let cases = [
        (
            "no-scale",
            Some(format!("{t}.weight_scale")),
            "weight_scale is missing",
        ),
        (
            "no-scale2",
            Some(format!("{t}.weight_scale_2")),
            "weight_scale_2 is missing",
        ),
        (
            "bad-shape",
            None,
            "needs backbone.layers.2.mixer.up_proj.weight_scale F8_E4M3 [96, 4]",
        ),
    ];
    for (tag, drop, want) in cases {
        let c = dir.join(tag);
        let (ok, err) = slice(&q, "full", None, &c);
        assert!(ok, "{err}");
        rewrite(&c, |n, d, s, x| {
            if drop.as_deref() == Some(n) {
                return None;
            }
            if tag == "bad-shape" && n == format!("{t}.weight_scale") {
                return Some((d, vec![s[0] * 2, s[1] / 2], x));
            }
            Some((d, s, x))
        });
        let (ok, _, err) = cli(&["info", c.to_str().unwrap()]);
        assert!(!ok, "{tag}: loaded");
        assert!(err.contains(t) && err.contains(want), "{tag}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn train(model: &Path, out: &Path, quant: Option<&str>, dtype: &str) -> serde_json::Value {
    let data = fixture("text/gpl-3.txt");
    let mut args = vec![
        "train",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--tokens",
        "512",
        "--seq",
        "32",
        "--batch",
        "2",
        "--seq2",
        "32",
        "--batch2",
        "2",
        "--warmup",
        "2",
        "--lr",
        "1e-3",
        "--eval-every",
        "0",
        "--eval-seqs",
        "2",
        "--no-progress",
        "--force",
        "--dtype",
        dtype,
    ];
    if let Some(q) = quant {
        args.extend(["--quant", q]);
    }
    let (ok, stdout, err) = cli(&args);
    assert!(ok, "train --quant {quant:?}: {err}");
    serde_json::from_str(&stdout).unwrap()
}

/// The first step's distillation loss of a run.
fn first_kd(out: &Path) -> f64 {
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    log.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find_map(|v| v["loss"].as_f64())
        .unwrap()
}

#[test]
fn qad_trains_through_fake_quantization_and_writes_a_nested_quantized_checkpoint() {
    let dir = tmp("qad");
    let m = elastic_copy("nemotron_h_dense", &dir, &DENSE);
    let toks = reference("nemotron_h_dense").tokens;
    let plain = dir.join("plain");
    train(&m, &plain, None, "f32");
    let mut kds = vec![first_kd(&plain)];
    // A BF16 copy of the elastic checkpoint (a full-budget slice keeps the manifest): a BF16
    // student written back as BF16.
    let bf = dir.join("bf16");
    let (ok, err) = slice(&m, "full", Some("bf16"), &bf);
    assert!(ok, "{err}");
    assert_eq!(
        load(&bf).meta.manifest.as_ref().map(|x| x.budgets.len()),
        Some(DENSE.len())
    );
    for (to, algo, src, dt) in [("fp8", "FP8", &m, "f32"), ("nvfp4", "NVFP4", &bf, "bf16")] {
        let out = dir.join(to);
        let s = train(src, &out, Some(to), dt);
        kds.push(first_kd(&out));
        let q = out.join("model");
        assert_eq!(quant_algo(&q), algo);
        let qm = load(&q);
        // Every budget of the learned manifest slices to its view, bit for bit.
        for b in s["budgets"].as_array().unwrap() {
            let name = b["name"].as_str().unwrap();
            let sl = dir.join(format!("{to}-{name}"));
            let (ok, err) = slice(&q, name, None, &sl);
            assert!(ok, "{to} {name}: {err}");
            assert_eq!(quant_algo(&sl), algo);
            assert!(
                logits_all(&qm, &toks, name) == logits_all(&load(&sl), &toks, "full"),
                "{to} {name}"
            );
        }
    }
    // The same first batch through the round-tripped weights: a different loss under each format
    // (the teacher is the unquantized model in all three runs).
    println!(
        "first-step KD: plain {} fp8 {} nvfp4 {}",
        kds[0], kds[1], kds[2]
    );
    assert!(
        kds[0] != kds[1] && kds[1] != kds[2] && kds[0] != kds[2],
        "{kds:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

fn ppl(model: &Path) -> f64 {
    let text = fixture("text/gpl-3.txt");
    let (ok, out, err) = cli(&[
        "perplexity",
        model.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--ctx",
        "128",
        "--chunks",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    serde_json::from_str::<serde_json::Value>(&out).unwrap()["ppl"]
        .as_f64()
        .unwrap()
}

/// SmolLM2 (a real model): FP8 keeps BF16's perplexity, NVFP4 PTQ loses a little; the GGUF and
/// HF NVFP4 files are the same model; every ISA level computes the same FP8/NVFP4 products.
#[test]
fn smollm2_fp8_and_nvfp4() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !src.exists() {
        let ok = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-model.sh"))
            .status()
            .unwrap()
            .success();
        assert!(ok, "could not fetch SmolLM2");
    }
    let dir = tmp("smollm2");
    let (bf, bfg) = (dir.join("bf16"), dir.join("bf16.gguf"));
    for (out, fmt) in [(&bf, "hf"), (&bfg, "gguf")] {
        let (ok, _, err) = cli(&[
            "slice",
            src.to_str().unwrap(),
            "-b",
            "full",
            "--dtype",
            "bf16",
            "--format",
            fmt,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
    }
    let (f8, f4, f4g) = (dir.join("fp8"), dir.join("nvfp4"), dir.join("nvfp4.gguf"));
    for (from, to, out) in [
        (&bf, "fp8", &f8),
        (&bf, "nvfp4", &f4),
        (&bfg, "nvfp4", &f4g),
    ] {
        let (ok, err) = quantize(from, to, out, &[]);
        assert!(ok, "{to}: {err}");
    }
    let (p16, p8, p4, p4g) = (ppl(&bf), ppl(&f8), ppl(&f4), ppl(&f4g));
    println!("SmolLM2 perplexity: BF16 {p16:.3}, FP8 {p8:.3}, NVFP4 {p4:.3} (GGUF {p4g:.3})");
    assert!((p8 / p16 - 1.0).abs() < 0.03, "FP8 {p8} vs BF16 {p16}");
    assert!(
        p4 / p16 > 1.0 && p4 / p16 < 1.25,
        "NVFP4 {p4} vs BF16 {p16}"
    );
    assert!(
        (p4g / p4 - 1.0).abs() < 0.005,
        "GGUF NVFP4 {p4g} vs HF NVFP4 {p4}"
    );
    let toks: Vec<u32> = (0..24).map(|i| 100 + 37 * i).collect();
    for m in [&f8, &f4] {
        let base = logits_cli(&[], m, &toks);
        for level in [("ELASTICA_ISA", "avx2"), ("ELASTICA_NO_SIMD", "1")] {
            let d = rel_diff(&logits_cli(&[level], m, &toks), &base);
            println!("{} under {level:?}: {d:.2e}", m.display());
            assert!(d < 0.02, "{} under {level:?}: {d}", m.display());
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
