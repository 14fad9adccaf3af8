//! The same weights in every layout and config spelling the loaders accept give the same logits:
//! sharded safetensors, the newest transformers layout (`model.*`, stacked experts), legacy
//! config names and layer-type vocabularies, and per-layer budget syntax.

mod common;
use common::*;
use safetensors::SafeTensors;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-layout-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

fn read(dir: &Path) -> Tensors {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write(path: &Path, t: &Tensors) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = t
        .iter()
        .map(|(n, (s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

fn same_as_reference(name: &str, dir: &Path) {
    let r = reference(name);
    let got = logits_all(&load(dir), &r.tokens, "full");
    let d = rel_diff(&got, &r.logits);
    assert!(d < 1e-4, "{name} from {}: {d}", dir.display());
}

#[test]
fn sharded_checkpoint() {
    let src = fixture("nemotron_h_moe");
    let d = tmp("shard");
    let t = read(&src);
    let (mut a, mut b) = (Tensors::new(), Tensors::new());
    let mut map = serde_json::Map::new();
    for (i, (n, v)) in t.into_iter().enumerate() {
        let f = if i % 2 == 0 {
            "model-00001-of-00002.safetensors"
        } else {
            "model-00002-of-00002.safetensors"
        };
        map.insert(n.clone(), f.into());
        if i % 2 == 0 {
            a.insert(n, v)
        } else {
            b.insert(n, v)
        };
    }
    write(&d.join("model-00001-of-00002.safetensors"), &a);
    write(&d.join("model-00002-of-00002.safetensors"), &b);
    std::fs::write(
        d.join("model.safetensors.index.json"),
        json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    same_as_reference("nemotron_h_moe", &d);
    // An index naming a tensor that its shard lacks is refused with both names.
    let mut map2 = map.clone();
    map2.insert(
        "backbone.extra.weight".into(),
        "model-00001-of-00002.safetensors".into(),
    );
    std::fs::write(
        d.join("model.safetensors.index.json"),
        json!({"weight_map": map2}).to_string(),
    )
    .unwrap();
    let e = elastica::models::load(&d).err().unwrap().to_string();
    assert!(
        e.contains("backbone.extra.weight") && e.contains("index.json"),
        "{e}"
    );
}

/// transformers 5 renames on load: backbone.→model., embeddings, stacked experts [E, I, H].
#[test]
fn newest_transformers_layout_with_stacked_experts() {
    let src = fixture("nemotron_h_moe");
    let d = tmp("stacked");
    let t = read(&src);
    let mut out = Tensors::new();
    let mut experts: BTreeMap<(String, String), BTreeMap<usize, Vec<u8>>> = BTreeMap::new();
    let mut shapes = BTreeMap::new();
    for (n, (s, b)) in t {
        let n = n.replacen("backbone.", "model.", 1);
        if let Some(i) = n.find(".experts.") {
            // model.layers.L.mixer.experts.E.up_proj.weight
            let rest: Vec<&str> = n[i + 9..].split('.').collect();
            let e: usize = rest[0].parse().unwrap();
            let key = (n[..i].to_string(), rest[1].to_string());
            shapes.insert(key.clone(), s.clone());
            experts.entry(key).or_default().insert(e, b);
            continue;
        }
        out.insert(n, (s, b));
    }
    for ((prefix, proj), m) in experts {
        let s = &shapes[&(prefix.clone(), proj.clone())];
        let mut bytes = vec![];
        for (_, b) in m.iter() {
            bytes.extend_from_slice(b);
        }
        out.insert(
            format!("{prefix}.experts.{proj}"),
            (vec![m.len(), s[0], s[1]], bytes),
        );
    }
    write(&d.join("model.safetensors"), &out);
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    same_as_reference("nemotron_h_moe", &d);
}

/// Legacy names (mamba_n_groups, mamba_d_conv, mamba_chunk_size, mamba_dt_limit, ...) and the
/// old layer vocabulary (mamba/attention/mlp/moe).
#[test]
fn legacy_config_spellings() {
    for name in ["nemotron_h_dense", "nemotron_h_moe"] {
        let src = fixture(name);
        let d = tmp(&format!("legacy-{name}"));
        std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let mut c = config(&src);
        let o = c.as_object_mut().unwrap();
        for (new, old) in [
            ("n_groups", "mamba_n_groups"),
            ("conv_kernel", "mamba_d_conv"),
            ("chunk_size", "mamba_chunk_size"),
            ("use_conv_bias", "mamba_conv_bias"),
        ] {
            if let Some(v) = o.remove(new) {
                o.insert(old.into(), v);
            }
        }
        o.remove("time_step_limit");
        o.insert("mamba_dt_limit".into(), json!([0.0, "Infinity"]));
        let kinds: Vec<&str> = match o.remove("hybrid_override_pattern") {
            Some(p) => p
                .as_str()
                .unwrap()
                .chars()
                .map(|c| match c {
                    'M' => "mamba",
                    '*' => "attention",
                    '-' => "mlp",
                    _ => "moe",
                })
                .collect::<Vec<_>>(),
            None => o["layers_block_type"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| match x.as_str().unwrap() {
                    "linear_attention" => "mamba",
                    "full_attention" => "attention",
                    "mlp" => "mlp",
                    _ => "moe",
                })
                .collect(),
        };
        o.insert("layers_block_type".into(), json!(kinds));
        std::fs::write(d.join("config.json"), c.to_string()).unwrap();
        same_as_reference(name, &d);
    }
}

#[test]
fn per_layer_budget_syntax() {
    let m = load(&fixture("nemotron_h_dense"));
    let r = reference("nemotron_h_dense");
    // M*-M-*M- : MLP layers 2, 4, 7; attention 1, 5.
    let a = logits_all(
        &m,
        &r.tokens,
        "ffn.2=48,ffn.4=48,ffn.7=48,heads.1=2,heads.5=2",
    );
    let b = logits_all(&m, &r.tokens, "ffn=48,heads=2");
    assert_eq!(a, b);
    let c = logits_all(&m, &r.tokens, "ffn=48,ffn.4=96");
    assert_ne!(a, c);
    let spec = m.budget("ffn=48,ffn.4=96").unwrap().spec(&m.shape);
    assert!(
        spec.contains("ffn=48") && spec.contains("ffn.4=96"),
        "{spec}"
    );
}

/// Nemotron-H configs as transformers writes them with default values (tools/ref/gen_python_config.py):
/// transformers 5's `{"__float__": "Infinity"}` and Python json's bare `Infinity` (transformers 4,
/// NVIDIA's hub configs). `time_step_limit` [0, inf] leaves Δ unclamped.
#[test]
fn configs_as_python_writes_them() {
    for file in ["config.json", "config_json.json"] {
        let d = tmp(&format!("python-{file}"));
        let src = fixture("nemotron_h_dense");
        std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        std::fs::copy(fixture("python_config").join(file), d.join("config.json")).unwrap();
        let m = load(&d);
        let mut mamba = 0;
        for b in &m.blocks {
            if let elastica::model::Mixer::Mamba(x) = &b.mixer {
                assert_eq!((x.dt_min, x.dt_max), (0.0, f32::INFINITY), "{file}");
                mamba += 1;
            }
        }
        assert_eq!(mamba, 3, "{file}");
        same_as_reference("nemotron_h_dense", &d);
    }
}

/// A finite `time_step_limit` clamps Δ = softplus(dt + dt_bias) (nemotron-h.md §2.3 step 4): the limit [c, c] gives
/// the same logits as Δ = c made by the weights (dt rows of in_proj zero, dt_bias = softplus⁻¹(c)),
/// and a limit around every Δ of the fixture (0.077..1.58, tools/ref/README.md) changes nothing.
#[test]
fn time_step_limit_clamps_delta() {
    let src = fixture("nemotron_h_dense");
    let r = reference("nemotron_h_dense");
    let c = 0.3f32;
    let with = |tag: &str, limit: Value, t: &Tensors| {
        let d = tmp(&format!("dt-{tag}"));
        write(&d.join("model.safetensors"), t);
        let mut cfg = config(&src);
        cfg["time_step_limit"] = limit;
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        logits_all(&load(&d), &r.tokens, "full")
    };
    let t = read(&src);
    let clamped = with("clamped", json!([c, c]), &t);
    assert!(rel_diff(&clamped, &r.logits) > 1e-2);
    let loose = with("loose", json!([0.05, 2.0]), &t);
    assert!(rel_diff(&loose, &r.logits) < 1e-4);

    let mut t2 = t.clone();
    let heads = config(&src)["mamba_num_heads"].as_u64().unwrap() as usize;
    for l in [0, 3, 6] {
        let (shape, w) = t2
            .get_mut(&format!("backbone.layers.{l}.mixer.in_proj.weight"))
            .unwrap();
        let keep = (shape[0] - heads) * shape[1] * 4;
        w[keep..].fill(0);
        let bias = (c.exp() - 1.0).ln().to_le_bytes().repeat(heads);
        t2.insert(
            format!("backbone.layers.{l}.mixer.dt_bias"),
            (vec![heads], bias),
        );
    }
    let by_weights = with("weights", json!([0.0, "Infinity"]), &t2);
    let d = rel_diff(&clamped, &by_weights);
    assert!(d < 1e-4, "{d}");
}
