//! Losses (method doc §4.2): forward KL from the frozen teacher at a temperature, and the budget
//! loss on the router's expected parameter count; next-token cross-entropy for training from
//! scratch.

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

/// Next-token cross-entropy of rows of `v` logits against `targets` (one per row), averaged,
/// with its gradient with respect to the logits: (softmax − onehot) / rows. Row-parallel, summed
/// in order like [`kd`].
pub fn ce(logits: &[f32], targets: &[u32], v: usize) -> (f64, Vec<f32>) {
    let rows = targets.len();
    debug_assert_eq!(logits.len(), rows * v);
    let mut grad = vec![0f32; logits.len()];
    let mut part = vec![0f64; rows];
    let gp = elastica_core::layers::SyncPtr(grad.as_mut_ptr());
    let pp = elastica_core::layers::SyncPtr(part.as_mut_ptr());
    pool().for_range(rows, 1, |range| {
        for r in range {
            let z = &logits[r * v..(r + 1) * v];
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
            let lse = m + s.ln();
            let t = targets[r] as usize;
            let g = unsafe { gp.slice(r * v, v) };
            for j in 0..v {
                g[j] = (((z[j] as f64 - lse).exp() - (j == t) as u8 as f64) / rows as f64) as f32;
            }
            unsafe { pp.slice(r, 1)[0] = lse - z[t] as f64 };
        }
    });
    (part.iter().sum::<f64>() / rows as f64, grad)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_and_its_gradient_against_finite_differences() {
        let v = 5;
        let z: Vec<f32> = (0..3 * v)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.4)
            .collect();
        let t = [2u32, 0, 4];
        let (l, g) = ce(&z, &t, v);
        // Direct: mean over rows of −log softmax(z)[t].
        let mut want = 0f64;
        for r in 0..3 {
            let row = &z[r * v..(r + 1) * v];
            let s: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
            want -= (row[t[r] as usize] as f64).exp().ln() - s.ln();
        }
        assert!((l - want / 3.0).abs() < 1e-9, "{l} {want}");
        for k in 0..z.len() {
            let (mut a, mut b) = (z.clone(), z.clone());
            a[k] += 1e-3;
            b[k] -= 1e-3;
            let fd = (ce(&a, &t, v).0 - ce(&b, &t, v).0) / 2e-3;
            assert!((fd - g[k] as f64).abs() < 1e-4, "{k}: {fd} vs {}", g[k]);
        }
    }
}
