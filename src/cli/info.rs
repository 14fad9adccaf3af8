use crate::Result;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

pub fn run(path: &Path, asked: &[String], as_json: bool) -> Result<()> {
    let m = crate::models::load(path)?;
    let s = &m.shape;
    let full = m.full_budget();
    let (pt, pa) = m.params(&full);
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for t in m.matrices() {
        *dtypes.entry(t.dtype.to_string()).or_default() += 1;
    }
    let mut budgets = vec![];
    if let Some(man) = &m.meta.manifest {
        for nb in &man.budgets {
            let b = m.budget(&nb.name)?;
            let (t, a) = m.params(&b);
            budgets.push(json!({
                "name": nb.name, "spec": b.spec(s), "params_total": t, "params_active": a,
                "bytes_per_token": m.bytes_per_token(&b), "target": nb.target,
            }));
        }
    }
    // Asked budgets; targets also say which manifest budgets they nest between, and by what rule.
    let mut resolved = vec![];
    for text in asked {
        let b = m.budget(text)?;
        let (t, a) = m.params(&b);
        let mut r = json!({
            "budget": text, "spec": b.spec(s), "params_total": t, "params_active": a,
            "bytes_per_token": m.bytes_per_token(&b),
        });
        let named = m
            .meta
            .manifest
            .iter()
            .flat_map(|x| &x.budgets)
            .any(|x| x.name == *text);
        if let (Some(Ok(target)), Some(man), false) =
            (crate::target::Target::parse(text), &m.meta.manifest, named)
        {
            let res = crate::target::resolve(&m, man, &target, text)?;
            r["between"] = json!([res.upper, res.lower]);
            r["goal"] = json!(res.goal);
            r["rule"] = json!(res.rule);
        }
        resolved.push(r);
    }
    let v = json!({
        "path": path.display().to_string(),
        "format": format!("{:?}", m.meta.format).to_lowercase(),
        "arch": m.arch(),
        "vocab": m.vocab,
        "layers": s.layers.len(),
        "pattern": m.kind_pattern(),
        "hidden": s.hidden,
        "attention": {"heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim},
        "ffn": s.ffn,
        "mamba": {"heads": s.mamba_heads, "head_dim": s.mamba_head_dim, "groups": s.mamba_groups, "state": s.ssm_state},
        "moe": {"experts": s.experts, "experts_per_tok": s.experts_per_tok, "expert_ffn": s.moe_ffn, "shared_ffn": s.shared_ffn, "groups": s.expert_groups},
        "tied_embeddings": m.lm_head.is_none(),
        "context": m.meta.context,
        "dtypes": dtypes,
        "parent": {"spec": full.spec(s), "params_total": pt, "params_active": pa, "bytes_per_token": m.bytes_per_token(&full)},
        "budgets": budgets,
        "resolved": resolved,
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap());
        return Ok(());
    }
    println!("model        {}", path.display());
    println!(
        "architecture {} ({})",
        m.arch(),
        v["format"].as_str().unwrap()
    );
    println!("layers       {} [{}]", s.layers.len(), m.kind_pattern());
    println!(
        "hidden       {}   vocab {}   context {}",
        s.hidden, m.vocab, m.meta.context
    );
    if s.heads > 0 {
        println!(
            "attention    {} query heads / {} KV heads x {}",
            s.heads, s.kv_heads, s.head_dim
        );
    }
    if s.ffn > 0 {
        println!("ffn          {}", s.ffn);
    }
    if s.mamba_heads > 0 {
        println!(
            "mamba        {} heads x {}, {} groups, state {}",
            s.mamba_heads, s.mamba_head_dim, s.mamba_groups, s.ssm_state
        );
    }
    if s.experts > 0 {
        println!(
            "moe          {} experts (top {}, {} groups) x {}, shared {}",
            s.experts, s.experts_per_tok, s.expert_groups, s.moe_ffn, s.shared_ffn
        );
    }
    println!(
        "dtypes       {}",
        dtypes
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "parent       {:.2}M params, {:.2}M active  [{}]",
        pt as f64 / 1e6,
        pa as f64 / 1e6,
        full.spec(s)
    );
    for b in &budgets {
        println!(
            "budget {:<8} {:.2}M params, {:.2}M active  [{}]",
            b["name"].as_str().unwrap(),
            b["params_total"].as_u64().unwrap() as f64 / 1e6,
            b["params_active"].as_u64().unwrap() as f64 / 1e6,
            b["spec"].as_str().unwrap()
        );
    }
    for r in &resolved {
        let between = match r["between"].as_array() {
            Some(x) if x[0] == x[1] => {
                format!("  (the manifest budget {})", x[0].as_str().unwrap())
            }
            Some(x) => format!(
                "  (between {} and {}, rule {})",
                x[0].as_str().unwrap(),
                x[1].as_str().unwrap(),
                r["rule"].as_str().unwrap()
            ),
            None => String::new(),
        };
        println!(
            "resolved {:<8} {:.2}M params, {:.2}M active  [{}]{between}",
            r["budget"].as_str().unwrap(),
            r["params_total"].as_u64().unwrap() as f64 / 1e6,
            r["params_active"].as_u64().unwrap() as f64 / 1e6,
            r["spec"].as_str().unwrap()
        );
    }
    Ok(())
}
