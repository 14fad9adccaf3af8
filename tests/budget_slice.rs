//! A budget run as a view of the parent must equal the same model physically sliced: this test
//! builds the sliced checkpoint itself (its own index rules, written from the method doc, not the
//! engine's segment code), loads it as an ordinary model, and compares logits, for every axis.

mod common;
use common::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone)]
struct T {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read(dir: &Path) -> BTreeMap<String, T> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let data = v
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (
                n,
                T {
                    shape: v.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

fn write(dir: &Path, t: &BTreeMap<String, T>, cfg: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    let bufs: Vec<(String, Vec<u8>, Vec<usize>)> = t
        .iter()
        .map(|(n, x)| {
            (
                n.clone(),
                x.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                x.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(cfg).unwrap(),
    )
    .unwrap();
}

/// Gathers indices `idx` along dimension `dim`.
fn take(t: &T, dim: usize, idx: &[usize]) -> T {
    let outer: usize = t.shape[..dim].iter().product();
    let inner: usize = t.shape[dim + 1..].iter().product();
    let n = t.shape[dim];
    let mut data = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            assert!(i < n);
            let s = (o * n + i) * inner;
            data.extend_from_slice(&t.data[s..s + inner]);
        }
    }
    let mut shape = t.shape.clone();
    shape[dim] = idx.len();
    T { shape, data }
}

fn range(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// The first `keep` members of each of `groups` equal groups of `total`.
fn per_group(total: usize, groups: usize, keep: usize) -> Vec<usize> {
    let per = total / groups;
    (0..groups).flat_map(|g| g * per..g * per + keep).collect()
}

fn parse(spec: &str) -> BTreeMap<String, String> {
    spec.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn num(b: &BTreeMap<String, String>, k: &str, d: usize) -> usize {
    b.get(k).map_or(d, |v| v.parse().unwrap())
}

fn slice_nemotron(src: &Path, dst: &Path, spec: &str) {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let t = read(src);
    let b = parse(spec);
    let c = |k: &str| cfg.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let kinds: Vec<char> = match cfg.get("hybrid_override_pattern") {
        Some(p) => p.as_str().unwrap().chars().collect(),
        None => cfg["layers_block_type"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| match x.as_str().unwrap() {
                "linear_attention" | "mamba" => 'M',
                "full_attention" | "attention" => '*',
                "mlp" => '-',
                _ => 'E',
            })
            .collect(),
    };
    let (h, heads, kvh, hd, ffn) = (
        c("hidden_size"),
        c("num_attention_heads"),
        c("num_key_value_heads"),
        c("head_dim"),
        c("intermediate_size"),
    );
    let (mh, mp, g, n) = (
        c("mamba_num_heads"),
        c("mamba_head_dim"),
        c("n_groups"),
        c("ssm_state_size"),
    );
    let (e, mf, sf, ng) = (
        c("n_routed_experts"),
        c("moe_intermediate_size"),
        c("moe_shared_expert_intermediate_size"),
        c("n_group").max(1),
    );
    let h2 = num(&b, "hidden", h);
    let skip: Vec<usize> = b.get("skip").map_or(vec![], |s| {
        s.split('+').map(|x| x.parse().unwrap()).collect()
    });
    let (heads2, ffn2, mh2, mp2) = (
        num(&b, "heads", heads),
        num(&b, "ffn", ffn),
        num(&b, "mamba_heads", mh),
        num(&b, "mamba_head_dim", mp),
    );
    let (e2, mf2, sf2) = (
        num(&b, "experts", e),
        num(&b, "moe_ffn", mf),
        num(&b, "shared_ffn", sf),
    );
    let hid = range(h2);
    let mut out = BTreeMap::new();
    let mut put = |k: String, v: T| {
        out.insert(k, v);
    };
    put(
        "backbone.embeddings.weight".into(),
        take(&t["backbone.embeddings.weight"], 1, &hid),
    );
    put("lm_head.weight".into(), take(&t["lm_head.weight"], 1, &hid));
    put(
        "backbone.norm_f.weight".into(),
        take(&t["backbone.norm_f.weight"], 0, &hid),
    );
    let mut pattern = String::new();
    let mut j = 0;
    for (i, &k) in kinds.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        pattern.push(k);
        let src = |s: &str| t[&format!("backbone.layers.{i}.{s}")].clone();
        let dst = |s: &str| format!("backbone.layers.{j}.{s}");
        put(dst("norm.weight"), take(&src("norm.weight"), 0, &hid));
        match k {
            'M' => {
                let di = mh * mp;
                let heads_kept = per_group(mh, g, mh2 / g);
                let inner: Vec<usize> = heads_kept
                    .iter()
                    .flat_map(|&hh| (0..mp2).map(move |p| hh * mp + p))
                    .collect();
                let mut rows = inner.clone();
                rows.extend(inner.iter().map(|x| x + di));
                rows.extend(2 * di..2 * di + 2 * g * n);
                rows.extend(heads_kept.iter().map(|x| x + 2 * di + 2 * g * n));
                put(
                    dst("mixer.in_proj.weight"),
                    take(&take(&src("mixer.in_proj.weight"), 0, &rows), 1, &hid),
                );
                let mut conv: Vec<usize> = inner.clone();
                conv.extend(di..di + 2 * g * n);
                put(
                    dst("mixer.conv1d.weight"),
                    take(&src("mixer.conv1d.weight"), 0, &conv),
                );
                put(
                    dst("mixer.conv1d.bias"),
                    take(&src("mixer.conv1d.bias"), 0, &conv),
                );
                for p in ["dt_bias", "A_log", "D"] {
                    put(
                        dst(&format!("mixer.{p}")),
                        take(&src(&format!("mixer.{p}")), 0, &heads_kept),
                    );
                }
                put(
                    dst("mixer.norm.weight"),
                    take(&src("mixer.norm.weight"), 0, &inner),
                );
                put(
                    dst("mixer.out_proj.weight"),
                    take(&take(&src("mixer.out_proj.weight"), 0, &hid), 1, &inner),
                );
            }
            '*' => {
                let qh = per_group(heads, kvh, heads2 / kvh);
                let qrows: Vec<usize> = qh.iter().flat_map(|&x| x * hd..(x + 1) * hd).collect();
                put(
                    dst("mixer.q_proj.weight"),
                    take(&take(&src("mixer.q_proj.weight"), 0, &qrows), 1, &hid),
                );
                put(
                    dst("mixer.k_proj.weight"),
                    take(&src("mixer.k_proj.weight"), 1, &hid),
                );
                put(
                    dst("mixer.v_proj.weight"),
                    take(&src("mixer.v_proj.weight"), 1, &hid),
                );
                put(
                    dst("mixer.o_proj.weight"),
                    take(&take(&src("mixer.o_proj.weight"), 0, &hid), 1, &qrows),
                );
            }
            '-' => {
                put(
                    dst("mixer.up_proj.weight"),
                    take(
                        &take(&src("mixer.up_proj.weight"), 0, &range(ffn2)),
                        1,
                        &hid,
                    ),
                );
                put(
                    dst("mixer.down_proj.weight"),
                    take(
                        &take(&src("mixer.down_proj.weight"), 0, &hid),
                        1,
                        &range(ffn2),
                    ),
                );
            }
            _ => {
                let kept = per_group(e, ng, e2 / ng);
                put(
                    dst("mixer.gate.weight"),
                    take(&take(&src("mixer.gate.weight"), 0, &kept), 1, &hid),
                );
                put(
                    dst("mixer.gate.e_score_correction_bias"),
                    take(&src("mixer.gate.e_score_correction_bias"), 0, &kept),
                );
                for (new, &old) in kept.iter().enumerate() {
                    let up = src(&format!("mixer.experts.{old}.up_proj.weight"));
                    let down = src(&format!("mixer.experts.{old}.down_proj.weight"));
                    put(
                        dst(&format!("mixer.experts.{new}.up_proj.weight")),
                        take(&take(&up, 0, &range(mf2)), 1, &hid),
                    );
                    put(
                        dst(&format!("mixer.experts.{new}.down_proj.weight")),
                        take(&take(&down, 0, &hid), 1, &range(mf2)),
                    );
                }
                put(
                    dst("mixer.shared_experts.up_proj.weight"),
                    take(
                        &take(&src("mixer.shared_experts.up_proj.weight"), 0, &range(sf2)),
                        1,
                        &hid,
                    ),
                );
                put(
                    dst("mixer.shared_experts.down_proj.weight"),
                    take(
                        &take(&src("mixer.shared_experts.down_proj.weight"), 0, &hid),
                        1,
                        &range(sf2),
                    ),
                );
            }
        }
        j += 1;
    }
    let mut cfg2 = cfg.clone();
    let o = cfg2.as_object_mut().unwrap();
    o.remove("layers_block_type");
    o.remove("mtp_layers_block_type");
    o.insert("hybrid_override_pattern".into(), pattern.clone().into());
    o.insert("num_hidden_layers".into(), pattern.len().into());
    for (k, v) in [
        ("hidden_size", h2),
        ("num_attention_heads", heads2),
        ("intermediate_size", ffn2),
        ("mamba_num_heads", mh2),
        ("mamba_head_dim", mp2),
    ] {
        o.insert(k.into(), v.into());
    }
    if e > 0 {
        for (k, v) in [
            ("n_routed_experts", e2),
            ("moe_intermediate_size", mf2),
            ("moe_shared_expert_intermediate_size", sf2),
        ] {
            o.insert(k.into(), v.into());
        }
    }
    write(dst, &out, &cfg2);
}

fn slice_llama(src: &Path, dst: &Path, spec: &str) {
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let t = read(src);
    let b = parse(spec);
    let c = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (h, heads, kvh, hd, ffn, nl) = (
        c("hidden_size"),
        c("num_attention_heads"),
        c("num_key_value_heads"),
        c("head_dim"),
        c("intermediate_size"),
        c("num_hidden_layers"),
    );
    let (h2, heads2, ffn2) = (
        num(&b, "hidden", h),
        num(&b, "heads", heads),
        num(&b, "ffn", ffn),
    );
    let skip: Vec<usize> = b.get("skip").map_or(vec![], |s| {
        s.split('+').map(|x| x.parse().unwrap()).collect()
    });
    let hid = range(h2);
    let mut out = BTreeMap::new();
    out.insert(
        "model.embed_tokens.weight".to_string(),
        take(&t["model.embed_tokens.weight"], 1, &hid),
    );
    out.insert(
        "model.norm.weight".to_string(),
        take(&t["model.norm.weight"], 0, &hid),
    );
    let qh = per_group(heads, kvh, heads2 / kvh);
    let qrows: Vec<usize> = qh.iter().flat_map(|&x| x * hd..(x + 1) * hd).collect();
    let mut j = 0;
    for i in 0..nl {
        if skip.contains(&i) {
            continue;
        }
        let s = |n: &str| t[&format!("model.layers.{i}.{n}")].clone();
        let d = |n: &str| format!("model.layers.{j}.{n}");
        out.insert(
            d("input_layernorm.weight"),
            take(&s("input_layernorm.weight"), 0, &hid),
        );
        out.insert(
            d("post_attention_layernorm.weight"),
            take(&s("post_attention_layernorm.weight"), 0, &hid),
        );
        out.insert(
            d("self_attn.q_proj.weight"),
            take(&take(&s("self_attn.q_proj.weight"), 0, &qrows), 1, &hid),
        );
        out.insert(
            d("self_attn.k_proj.weight"),
            take(&s("self_attn.k_proj.weight"), 1, &hid),
        );
        out.insert(
            d("self_attn.v_proj.weight"),
            take(&s("self_attn.v_proj.weight"), 1, &hid),
        );
        out.insert(
            d("self_attn.o_proj.weight"),
            take(&take(&s("self_attn.o_proj.weight"), 0, &hid), 1, &qrows),
        );
        for p in ["gate_proj", "up_proj"] {
            out.insert(
                d(&format!("mlp.{p}.weight")),
                take(
                    &take(&s(&format!("mlp.{p}.weight")), 0, &range(ffn2)),
                    1,
                    &hid,
                ),
            );
        }
        out.insert(
            d("mlp.down_proj.weight"),
            take(&take(&s("mlp.down_proj.weight"), 0, &hid), 1, &range(ffn2)),
        );
        j += 1;
    }
    let mut cfg2 = cfg.clone();
    let o = cfg2.as_object_mut().unwrap();
    for (k, v) in [
        ("hidden_size", h2),
        ("num_attention_heads", heads2),
        ("intermediate_size", ffn2),
        ("num_hidden_layers", j),
    ] {
        o.insert(k.into(), v.into());
    }
    write(dst, &out, &cfg2);
}

fn check(name: &str, specs: &[&str], slicer: fn(&Path, &Path, &str)) {
    let src = fixture(name);
    let r = reference(name);
    let parent = load(&src);
    let tmp = std::env::temp_dir().join(format!("elastica-slice-{name}-{}", std::process::id()));
    for spec in specs {
        let dir = tmp.join(spec.replace([',', '=', '+'], "_"));
        slicer(&src, &dir, spec);
        let sliced = load(&dir);
        let view = logits_all(&parent, &r.tokens, spec);
        let phys = logits_all(&sliced, &r.tokens, "full");
        let d = rel_diff(&view, &phys);
        // Parameter counts of the view equal those of the physical slice.
        assert_eq!(
            parent.params(&parent.budget(spec).unwrap()),
            sliced.params(&sliced.full_budget()),
            "{name} [{spec}] params"
        );
        println!("{name} [{spec}]: view vs slice {d:.2e}");
        assert!(
            d < 1e-5,
            "{name} [{spec}]: budget view differs from the sliced model by {d}"
        );
        // And the budget is not a no-op.
        assert!(
            rel_diff(&view, &r.logits) > 1e-3,
            "{name} [{spec}] did not change the model"
        );
    }
    std::fs::remove_dir_all(&tmp).ok();
    // The full budget, written out explicitly, is the parent exactly.
    let spec = parent.full_budget().spec(&parent.shape);
    assert_eq!(
        logits_all(&parent, &r.tokens, &spec),
        logits_all(&parent, &r.tokens, "full")
    );
}

#[test]
fn nemotron_dense_views_equal_slices() {
    check(
        "nemotron_h_dense",
        &[
            "hidden=32",
            "ffn=48",
            "heads=2",
            "mamba_heads=4",
            "mamba_head_dim=8",
            "skip=2+5",
            "hidden=48,ffn=64,heads=2,mamba_heads=6,mamba_head_dim=8,skip=1",
        ],
        slice_nemotron,
    );
}

#[test]
fn nemotron_moe_views_equal_slices() {
    check(
        "nemotron_h_moe",
        &[
            "experts=4",
            "moe_ffn=16",
            "shared_ffn=24",
            "hidden=32,experts=6,moe_ffn=16,shared_ffn=16,mamba_heads=6,heads=2,skip=4",
        ],
        slice_nemotron,
    );
}

#[test]
fn llama_views_equal_slices() {
    check(
        "llama_tiny",
        &[
            "hidden=32",
            "ffn=48",
            "heads=2",
            "skip=1",
            "hidden=48,ffn=64,heads=2,skip=0",
        ],
        slice_llama,
    );
}

/// A sequence can switch budgets mid-way: the cache layout is the parent's, and a prefix run
/// under a small budget followed by the full one matches running the same schedule again.
#[test]
fn budget_switch_mid_sequence() {
    use elastica::{Cache, Logits};
    for name in ["nemotron_h_dense", "nemotron_h_moe", "llama_tiny"] {
        let r = reference(name);
        let m = load(&fixture(name));
        let small = m.budget("hidden=32,heads=2").unwrap();
        let full = m.full_budget();
        let run = || {
            let mut c = Cache::new(&m, 64);
            m.forward(&r.tokens[..12], &small, &mut c, Logits::None)
                .unwrap();
            m.forward(&r.tokens[12..], &full, &mut c, Logits::All)
                .unwrap()
                .to_vec()
        };
        let a = run();
        let b = run();
        assert_eq!(a, b);
        // The small-budget prefix influences the full continuation (the cache was handed over).
        let mut c = Cache::new(&m, 64);
        let all = m
            .forward(&r.tokens, &full, &mut c, Logits::All)
            .unwrap()
            .to_vec();
        let tail = &all[12 * m.vocab..];
        let d = a
            .iter()
            .zip(tail)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d > 1e-4, "{name}: switching budgets had no effect");
    }
}

/// Manifests in all three places (config.json "elastic", elastic.json side file, GGUF side file),
/// named budgets usable everywhere, and `info --json` listing them with parameter counts.
#[test]
fn manifest_budgets() {
    use std::process::Command;
    let src = fixture("nemotron_h_dense");
    let parent = load(&src);
    let full = parent.full_budget().spec(&parent.shape);
    let manifest = serde_json::json!({
        "format": "elastica.manifest/1",
        "parent": full,
        "budgets": [
            {"name": "full", "spec": full},
            {"name": "mid", "spec": "hidden=48,ffn=64,heads=2,mamba_heads=6", "target": "params:0.7"},
            {"name": "small", "spec": "hidden=32,ffn=48,heads=2,mamba_heads=4,mamba_head_dim=8"}
        ]
    });
    let tmp = std::env::temp_dir().join(format!("elastica-manifest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, tmp.join(p.file_name().unwrap())).unwrap();
    }
    let r = reference("nemotron_h_dense");
    let check = |dir: &Path, model: &Path| {
        let m = load(model);
        assert_eq!(
            logits_all(&m, &r.tokens, "small"),
            logits_all(
                &m,
                &r.tokens,
                "hidden=32,ffn=48,heads=2,mamba_heads=4,mamba_head_dim=8"
            )
        );
        let out = Command::new(env!("CARGO_BIN_EXE_elastica"))
            .args(["info", model.to_str().unwrap(), "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let b = v["budgets"].as_array().unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[1]["name"], "mid");
        let spec = b[1]["spec"].as_str().unwrap();
        let mb = m.budget(spec).unwrap();
        assert_eq!(b[1]["params_total"].as_u64().unwrap(), m.params(&mb).0);
        assert_eq!(b[1]["params_active"].as_u64().unwrap(), m.params(&mb).1);
        assert_eq!(v["parent"]["params_total"], b[0]["params_total"]);
        assert!(b[2]["params_total"].as_u64() < b[1]["params_total"].as_u64());
        let _ = dir;
    };
    // 1. config.json "elastic"
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["elastic"] = manifest.clone();
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    check(&tmp, &tmp);
    // 2. elastic.json beside config.json
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    std::fs::write(tmp.join("elastic.json"), manifest.to_string()).unwrap();
    check(&tmp, &tmp);
    // 3. MODEL.gguf.elastic.json beside a GGUF
    std::fs::write(
        tmp.join("model-f32.gguf.elastic.json"),
        manifest.to_string(),
    )
    .unwrap();
    check(&tmp, &tmp.join("model-f32.gguf"));
    std::fs::remove_dir_all(&tmp).ok();
}
