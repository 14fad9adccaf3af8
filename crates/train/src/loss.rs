//! Losses (method doc §4.2): forward KL from the frozen teacher at a temperature, and the budget
//! loss on the router's expected parameter count.

use crate::error::Result;
use candle_core::Tensor as CT;
use elastica_core::kernels::pool::pool;

/// Forward KL(p_teacher ‖ p_student) at temperature `temp`, scaled by temp² and averaged over
/// rows of `v` logits, with its gradient with respect to the student logits:
/// ∂/∂z_s = temp · (q_s − p_t) / rows. Computed row-parallel outside the autodiff graph.
pub fn kd(student: &[f32], teacher: &[f32], v: usize, temp: f64) -> (f64, Vec<f32>) {
    let rows = student.len() / v;
    let mut grad = vec![0f32; student.len()];
    // One partial per row, summed in order: the loss does not depend on the thread count.
    let mut part = vec![0f64; rows];
    let gp = elastica_core::layers::SyncPtr(grad.as_mut_ptr());
    let pp = elastica_core::layers::SyncPtr(part.as_mut_ptr());
    let it = 1.0 / temp;
    pool().for_range(rows, 1, |range| {
        let mut q = vec![0f64; v];
        let mut p = vec![0f64; v];
        for r in range {
            let mut acc = 0f64;
            let zs = &student[r * v..(r + 1) * v];
            let zt = &teacher[r * v..(r + 1) * v];
            let lse = |z: &[f32], out: &mut [f64]| -> f64 {
                let m = z
                    .iter()
                    .fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64 * it));
                let mut s = 0f64;
                for (o, &x) in out.iter_mut().zip(z) {
                    *o = (x as f64 * it - m).exp();
                    s += *o;
                }
                out.iter_mut().for_each(|o| *o /= s);
                m + s.ln()
            };
            let ls = lse(zs, &mut q);
            let lt = lse(zt, &mut p);
            let g = unsafe { gp.slice(r * v, v) };
            for j in 0..v {
                if p[j] > 0.0 {
                    // log p − log q = (zt − lt) − (zs − ls) at the temperature
                    acc += p[j] * ((zt[j] as f64 * it - lt) - (zs[j] as f64 * it - ls));
                }
                g[j] = (temp * (q[j] - p[j]) / rows as f64) as f32;
            }
            unsafe { pp.slice(r, 1)[0] = acc };
        }
    });
    let loss = part.iter().sum::<f64>() * temp * temp / rows as f64;
    (loss, grad)
}

/// A scalar whose gradient with respect to `logits` is `grad` (lets the hand-computed KD gradient
/// flow into candle's backward pass).
pub fn surrogate(logits: &CT, grad: Vec<f32>) -> Result<CT> {
    let g = CT::from_vec(grad, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
    Ok((logits * g)?.sum_all()?)
}

/// |E[params] − target| / target.
pub fn budget_loss(expected: &CT, target: f64) -> Result<CT> {
    Ok(((expected - target)? / target)?.abs()?)
}
