//! AdamW (decoupled weight decay) with its moments kept as tensors, so a checkpoint holds the whole
//! optimizer state and a resumed run continues bit for bit.

use crate::error::Result;
use candle_core::{Tensor as CT, Var, backprop::GradStore};

pub struct AdamW {
    pub m: Vec<CT>,
    pub v: Vec<CT>,
    pub t: u64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl AdamW {
    pub fn new(vars: &[Var], weight_decay: f64) -> Result<AdamW> {
        Ok(AdamW {
            m: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|v| v.zeros_like())
                .collect::<candle_core::Result<_>>()?,
            t: 0,
            weight_decay,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
        })
    }

    /// One update of every var that has a gradient; `scale` multiplies the gradients (clipping).
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &GradStore,
        lr: f64,
        scale: Option<f64>,
    ) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = match scale {
                Some(s) => (g * s)?,
                None => g.clone(),
            };
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let upd = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.eps)?)?;
            let w = var.as_tensor();
            let new = ((w * (1.0 - lr * self.weight_decay))? - (upd * lr)?)?;
            var.set(&new)?;
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients of `vars`.
pub fn grad_norm(vars: &[Var], grads: &GradStore) -> Result<f64> {
    let mut s = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            s += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(s.sqrt())
}
