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
    let mut grad = student.to_vec();
    (kd_in_place(&mut grad, teacher, v, temp), grad)
}

/// [`kd`] with the gradient written over the student logits `z` (training holds one
/// [B·T, vocab] buffer instead of two).
pub fn kd_in_place(z: &mut [f32], teacher: &[f32], v: usize, temp: f64) -> f64 {
    let rows = z.len() / v;
    // One partial per row, summed in order: the loss does not depend on the thread count.
    let mut part = vec![0f64; rows];
    let gp = elastica_core::layers::SyncPtr(z.as_mut_ptr());
    let pp = elastica_core::layers::SyncPtr(part.as_mut_ptr());
    let it = 1.0 / temp;
    pool().for_range(rows, 1, |range| {
        let mut q = vec![0f64; v];
        let mut p = vec![0f64; v];
        for r in range {
            let mut acc = 0f64;
            // Safety: row r belongs to this range alone.
            let zs = unsafe { gp.slice(r * v, v) };
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
            for j in 0..v {
                if p[j] > 0.0 {
                    // log p − log q = (zt − lt) − (zs − ls) at the temperature
                    acc += p[j] * ((zt[j] as f64 * it - lt) - (zs[j] as f64 * it - ls));
                }
                zs[j] = (temp * (q[j] - p[j]) / rows as f64) as f32;
            }
            unsafe { pp.slice(r, 1)[0] = acc };
        }
    });
    part.iter().sum::<f64>() * temp * temp / rows as f64
}

/// Next-token cross-entropy of rows of `v` logits against `targets` (one per row), averaged,
/// with its gradient with respect to the logits: (softmax − onehot) / rows. Row-parallel, summed
/// in order like [`kd`].
pub fn ce(logits: &[f32], targets: &[u32], v: usize) -> (f64, Vec<f32>) {
    let mut grad = logits.to_vec();
    (ce_in_place(&mut grad, targets, v), grad)
}

/// [`ce`] with the gradient written over the logits `z`.
pub fn ce_in_place(z: &mut [f32], targets: &[u32], v: usize) -> f64 {
    let rows = targets.len();
    debug_assert_eq!(z.len(), rows * v);
    let mut part = vec![0f64; rows];
    let gp = elastica_core::layers::SyncPtr(z.as_mut_ptr());
    let pp = elastica_core::layers::SyncPtr(part.as_mut_ptr());
    pool().for_range(rows, 1, |range| {
        for r in range {
            // Safety: row r belongs to this range alone.
            let z = unsafe { gp.slice(r * v, v) };
            let m = z.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
            let s: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
            let lse = m + s.ln();
            let t = targets[r] as usize;
            unsafe { pp.slice(r, 1)[0] = lse - z[t] as f64 };
            for (j, x) in z.iter_mut().enumerate() {
                *x = (((*x as f64 - lse).exp() - (j == t) as u8 as f64) / rows as f64) as f32;
            }
        }
    });
    part.iter().sum::<f64>() / rows as f64
}

/// The hand-computed gradient of `rows` logit rows as a tensor for [`crate::net::Tape::backward`].
pub fn grad_tensor(grad: Vec<f32>, rows: usize, dt: candle_core::DType) -> Result<CT> {
    let v = grad.len() / rows.max(1);
    Ok(CT::from_vec(grad, (rows, v), &crate::net::dev())?.to_dtype(dt)?)
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
