//! Nested training: the training graph against the engine, gradients against finite
//! differences, checkpoints and resume, refusals.
mod common;
use candle_core::{DType, Tensor as CT, Var};
use common::fixture;
use elastica::train::masks::Masks;
use elastica::train::net::Net;
use elastica::{Cache, Logits};

const CASES: [(&str, &str, &str); 5] = [
    ("nemotron_h_dense", "", "hidden=48,ffn=64,heads=2,mamba_heads=4,mamba_head_dim=8"),
    ("nemotron_h_dense", "model-f32.gguf", "hidden=40,ffn=32,heads=2,mamba_heads=6,mamba_head_dim=12"),
    ("nemotron_h_moe", "", "hidden=48,moe_ffn=16,experts=4,shared_ffn=24,heads=2,mamba_heads=4,mamba_head_dim=8"),
    ("nemotron_h_moe", "model-f32.gguf", "hidden=56,moe_ffn=24,experts=6,shared_ffn=16,mamba_head_dim=8"),
    ("llama_tiny", "", "hidden=48,ffn=64,heads=2"),
];

fn open(name: &str, file: &str) -> elastica::models::Checkpoint {
    let p = if file.is_empty() { fixture(name) } else { fixture(name).join(file) };
    elastica::models::open(&p).unwrap()
}

fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + seed * 11 + 5) % 256).collect()
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
                let got: Vec<f32> = net.forward(&toks, nb, t, &masks).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let mut want = vec![];
                for s in toks.chunks(t) {
                    let mut c = Cache::new(m, 64);
                    want.extend_from_slice(m.forward(s, &b, &mut c, Logits::All).unwrap());
                }
                let mx = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                let md = got.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
                eprintln!("{name} {file} {dt:?} {spec}: rel {:.2e}", md / mx);
                assert!(md / mx < 2e-5, "{name} {file} {spec} {dt:?}: rel diff {}", md / mx);
            }
        }
    }
}

fn flat(t: &CT) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
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
        let lossf = || -> CT {
            let dec = router.decide(1, 0.7, Some(&mut Rng::new(11)), false).unwrap();
            let masks = router.masks(&dec, &budgets[1], &m.shape, DType::F64).unwrap();
            let logits = net.forward(&toks, nb, t, &masks).unwrap();
            let e = net
                .param_count(
                    &|axis, l| Ok(router.expected(&dec, axis, l)?.unwrap_or(CT::new(elastica::train::router::size_of(&budgets[1], axis, l) as f64, &candle_core::Device::Cpu)?)),
                    &|_| true,
                )
                .unwrap();
            ((logits * &rw).unwrap().sum_all().unwrap() + loss::budget_loss(&e, target).unwrap()).unwrap()
        };
        let l0 = lossf();
        let grads = l0.backward().unwrap();
        let mut vars: Vec<(String, Var)> = net.params.iter().filter(|p| p.trainable()).map(|p| (p.name.clone(), p.var.clone())).collect();
        for (i, v) in router.vars().into_iter().enumerate() {
            vars.push((format!("router.{i}"), v.clone()));
        }
        let mut checked = 0;
        let mut worst = 0f64;
        let mut failures: Vec<String> = vec![];
        for (pname, v) in &vars {
            let g = grads.get(v.as_tensor()).map(flat).unwrap_or_else(|| vec![0.0; v.as_tensor().elem_count()]);
            let orig = flat(v.as_tensor());
            // The largest-gradient element and two pseudo-random ones.
            let imax = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
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
                    failures.push(format!("{name} {pname}[{i}]: analytic {} vs finite difference {fd}", g[i]));
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
    let s: Vec<f32> = (0..rows * v).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
    let t: Vec<f32> = (0..rows * v).map(|i| ((i * 17 % 13) as f32 - 6.0) * 0.25).collect();
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
            let fd = (elastica::train::loss::kd(&sp, &t, v, temp).0 - elastica::train::loss::kd(&sm, &t, v, temp).0) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() < 1e-4 * fd.abs().max(1e-2), "T={temp} [{i}]: {} vs {fd}", g[i]);
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
    for bi in 0..2 {
        let spec = router.argmax_spec(bi, &budgets[bi], &m.shape).unwrap();
        assert_eq!(spec, budgets[bi].spec(&m.shape), "warm start reproduces the manifest");
        let dec = router.decide(bi, 0.05, None, true).unwrap();
        let got = router.masks(&dec, &budgets[bi], &m.shape, DType::F64).unwrap();
        let want = Masks::hard(&m.shape, &budgets[bi], DType::F64).unwrap();
        assert_eq!(flat(&got.hidden), flat(&want.hidden));
        for (a, b) in got.layers.iter().zip(&want.layers) {
            for (x, y) in [(&a.ffn, &b.ffn), (&a.heads, &b.heads), (&a.inner, &b.inner)] {
                assert_eq!(x.as_ref().map(flat), y.as_ref().map(flat));
            }
        }
    }
}
