//! A new checkpoint's first weights (`elastica init`, training from scratch): every tensor an
//! architecture reads, by its HF name and shape, with the reference implementation's initial
//! values (transformers' `NemotronHPreTrainedModel._init_weights`; Mamba-2's A and Δt).

use crate::rng::Rng;

/// How a tensor starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// N(0, σ²).
    Normal(f32),
    /// U(−b, b).
    Uniform(f32),
    Ones,
    Zeros,
    /// Mamba-2 `A_log` = log(1..=heads) (spec §2.3.5).
    ALog,
    /// Mamba-2 `dt_bias` = softplus⁻¹(Δt), Δt log-uniform in [min, max], at least `floor`.
    DtBias {
        min: f32,
        max: f32,
        floor: f32,
    },
}

/// One tensor of a new checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct InitTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl InitTensor {
    pub fn new(name: impl Into<String>, shape: Vec<usize>, init: Init) -> InitTensor {
        InitTensor {
            name: name.into(),
            shape,
            init,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The tensor's values, drawn from `rng`.
    pub fn values(&self, rng: &mut Rng) -> Vec<f32> {
        let n = self.numel();
        match self.init {
            Init::Normal(s) => (0..n).map(|_| s * normal(rng)).collect(),
            Init::Uniform(b) => (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * b as f64) as f32)
                .collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
            Init::ALog => (1..=n).map(|h| (h as f32).ln()).collect(),
            Init::DtBias { min, max, floor } => (0..n)
                .map(|_| {
                    let (lo, hi) = ((min as f64).ln(), (max as f64).ln());
                    let dt = (lo + rng.uniform() * (hi - lo)).exp().max(floor as f64);
                    // softplus⁻¹(dt) = dt + log(1 − e^−dt)
                    (dt + (-(-dt).exp_m1()).ln()) as f32
                })
                .collect(),
        }
    }
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut Rng) -> f32 {
    let u = rng.uniform().max(1e-300);
    let v = rng.uniform();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_follow_their_laws() {
        let mut r = Rng::new(1);
        let t = InitTensor::new("w", vec![200, 100], Init::Normal(0.02));
        let v = t.values(&mut r);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let sd =
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(mean.abs() < 5e-4 && (sd - 0.02).abs() < 5e-4, "{mean} {sd}");
        let dt = InitTensor::new(
            "dt_bias",
            vec![1000],
            Init::DtBias {
                min: 1e-3,
                max: 0.1,
                floor: 1e-4,
            },
        )
        .values(&mut r);
        // softplus(dt_bias) lands back in [min, max].
        for b in dt {
            let s = (b as f64).exp().ln_1p();
            assert!((0.99e-3..=0.101).contains(&s), "{s}");
        }
        let a = InitTensor::new("A_log", vec![4], Init::ALog).values(&mut r);
        assert_eq!(a, vec![0.0, 2f32.ln(), 3f32.ln(), 4f32.ln()]);
    }
}
