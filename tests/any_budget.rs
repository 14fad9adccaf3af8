//! Any budget, not only the manifest's (issue 11, point 7): fractions and counts resolve to specs
//! nested between the manifest's neighbouring budgets, monotone in every axis, within one granule
//! of the target; `info` shows the resolution.

mod common;
use common::*;
use elastica::budget::{Axis, Budget, BudgetSpec};
use elastica::model::Model;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn ok(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_elastica"))
        .args(args)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{args:?}: {e}");
    String::from_utf8(o.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// rank + elastify a fixture into a fresh folder (`objective`: mass or logits).
fn elastic(name: &str, budgets: &str, axes: &str, objective: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("elastica-anyb-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let (src, imp, out) = (fixture(name), d.join("imp.json"), d.join("el"));
    let calib = fixture("text/gpl-3.txt");
    ok(&[
        "rank",
        s(&src),
        "--calib",
        s(&calib),
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
    ok(&[
        "elastify",
        s(&src),
        "--importance",
        s(&imp),
        "--budgets",
        budgets,
        "--axes",
        axes,
        "--objective",
        objective,
        "--out",
        s(&out),
    ]);
    out
}

/// The most parameters one granule of any knob removes from the parent (an upper bound on a
/// granule anywhere below it): 16 channels, one head per KV group, one Mamba head per group, one
/// expert per routing group, or one layer.
fn granule(m: &Model) -> u64 {
    let sh = &m.shape;
    let full = m.params(&m.full_budget()).0;
    let mut most = 0;
    for a in Axis::ALL {
        let n = sh.size(a);
        let step = match a {
            Axis::Heads | Axis::MambaHeads | Axis::Experts => sh.groups(a),
            _ => 16.min(n),
        };
        if n == 0 || step >= n || !sh.layers.iter().any(|&k| a.applies(k)) {
            continue;
        }
        let mut sp = BudgetSpec::default();
        sp.global[a] = Some(n - step);
        if let Ok(b) = sp.resolve(sh) {
            most = most.max(full - m.params(&b).0);
        }
    }
    for l in 0..sh.layers.len() {
        let mut sp = BudgetSpec::default();
        sp.skip.insert(l);
        most = most.max(full - m.params(&sp.resolve(sh).unwrap()).0);
    }
    most
}

/// Sweeps fractions from the smallest manifest budget to the parent.
fn sweep(out: &Path) {
    let m = load(out);
    let man = m.meta.manifest.clone().expect("a manifest");
    assert!(man.mass.is_some(), "elastify stores the importance mass");
    let full = m.params(&m.full_budget()).0 as f64;
    let named: Vec<(String, Budget, f64)> = man
        .budgets
        .iter()
        .map(|nb| {
            let b = m.budget(&nb.name).unwrap();
            let n = m.params(&b).0 as f64;
            (nb.name.clone(), b, n)
        })
        .collect();
    let low = named.last().unwrap().2 / full;
    let g = granule(&m) as f64;
    let mut prev: Option<Budget> = None;
    let steps = 40;
    for i in 0..=steps {
        let f = low + (1.0 - low) * i as f64 / steps as f64;
        let text = format!("{f}");
        let b = m.budget(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let n = m.params(&b).0 as f64;
        let goal = f * full;
        assert!(n <= goal + 0.5, "{text}: {n} above {goal}");
        assert!(
            goal - n <= g,
            "{text}: {n} more than a granule ({g}) below {goal}"
        );
        // Between its neighbours: nested in the next larger manifest budget (or the parent),
        // holding the next smaller one.
        let upper = named
            .iter()
            .rev()
            .find(|x| x.2 >= goal)
            .map_or_else(|| m.full_budget(), |x| x.1.clone());
        let lower = &named.iter().find(|x| x.2 <= goal).unwrap().1;
        assert!(b.nested_in(&upper), "{text} not in its upper neighbour");
        assert!(
            lower.nested_in(&b),
            "{text} does not hold its lower neighbour"
        );
        if let Some(p) = &prev {
            assert!(
                p.nested_in(&b),
                "{text}: not monotone ({})",
                b.spec(&m.shape)
            );
        }
        prev = Some(b);
    }
    // A manifest budget's own target, however written, gives that budget back; so does its count.
    for nb in &man.budgets {
        let (b, n) = named
            .iter()
            .find(|x| x.0 == nb.name)
            .map(|x| (&x.1, x.2))
            .unwrap();
        let t = nb.target.as_deref().unwrap();
        let v: f64 = t.parse().unwrap_or(1.0);
        for text in [
            format!("{v:.3}"),
            format!("params:{v}"),
            format!("params:{n}"),
        ] {
            let r = m.budget(&text).unwrap();
            assert_eq!(r.spec(&m.shape), b.spec(&m.shape), "{text} vs {}", nb.name);
        }
    }
}

#[test]
fn fractions_resolve_between_neighbours_llama() {
    sweep(&elastic(
        "llama_tiny",
        "full,0.75,0.5",
        "hidden,ffn,heads",
        "mass",
    ));
}

#[test]
fn fractions_resolve_between_neighbours_every_axis_and_depth() {
    let out = elastic(
        "nemotron_h_moe",
        "1.0,0.7,0.4",
        "hidden,moe_ffn,experts,shared_ffn,heads,mamba_heads,mamba_head_dim,depth",
        "logits",
    );
    sweep(&out);
    // Active-parameter targets walk the same way, counted on active parameters.
    let m = load(&out);
    let pa = m.params(&m.full_budget()).1 as f64;
    let small = m.params(&m.budget("0.4").unwrap()).1 as f64 / pa;
    let mut prev: Option<Budget> = None;
    for i in 0..=20 {
        let f = small + (1.0 - small) * i as f64 / 20.0;
        let b = m.budget(&format!("active:{f}")).unwrap();
        assert!(m.params(&b).1 as f64 <= f * pa + 0.5, "active:{f}");
        if let Some(p) = &prev {
            assert!(p.nested_in(&b), "active:{f}: not monotone");
        }
        prev = Some(b);
    }
    // info shows what a target resolves to, and the neighbours it nests between.
    let v: Value =
        serde_json::from_str(&ok(&["info", s(&out), "--json", "-b", "0.55", "-b", "0.4"])).unwrap();
    let r = &v["resolved"][0];
    assert_eq!(r["between"], serde_json::json!(["0.7", "0.4"]));
    assert_eq!(r["rule"], "mass");
    let b = m.budget("0.55").unwrap();
    assert_eq!(r["spec"], b.spec(&m.shape));
    assert_eq!(r["params_total"], m.params(&b).0);
    assert!(r["goal"].as_f64().unwrap() >= m.params(&b).0 as f64);
    // A manifest name shows no neighbours.
    assert!(v["resolved"][1]["between"].is_null());
    let text = ok(&["info", s(&out), "-b", "0.55"]);
    assert!(text.contains("between 0.7 and 0.4, rule mass"), "{text}");
}
