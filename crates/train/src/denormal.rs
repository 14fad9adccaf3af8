//! Flush-to-zero for training threads (cf. `torch.set_flush_denormal(True)`).
//!
//! At a low Gumbel temperature the soft masks carry router probabilities near f32's underflow
//! (e^(-Δ/τ)); multiplied through the activations and gradients they become denormals, which x86
//! handles in microcode at ~100x the cost. On the SmolLM2 run this turned a 17 s step into 230 s.
//! Values below 2^-126 cannot move a training step, so they are flushed to zero instead.

/// Sets flush-to-zero and denormals-are-zero on the calling thread.
pub fn flush_on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes this thread's MXCSR; FTZ (bit 15) and DAZ (bit 6) only change
    // how denormal f32/f64 values are produced and read.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets FPCR.FZ (bit 24), which only flushes denormal results and inputs to zero.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
}

/// Whether the calling thread flushes denormals (x86_64 and aarch64; false elsewhere).
pub fn flushing_on_this_thread() -> bool {
    let tiny = std::hint::black_box(f32::MIN_POSITIVE);
    std::hint::black_box(tiny * 0.5) == 0.0
}

/// Runs `f` once on every thread training computes on: this one, elastica's pool (the teacher,
/// the KD loss), candle's barrier pool and rayon's pools (candle's element-wise ops and GEMM).
fn on_every_thread(f: impl Fn() + Sync) {
    f();
    elastica_core::kernels::pool::pool().broadcast(|_| f());
    candle_core::utils::barrier_pool().execute(|_| f());
    rayon::broadcast(|_| f());
    candle_core::utils::with_threadpool(|| rayon::broadcast(|_| f()));
}

/// Flush denormals on every thread training computes on.
pub fn flush_everywhere() {
    on_every_thread(flush_on_this_thread);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn every_training_thread_flushes() {
        // Start every pool first: a thread spawned after the flush would inherit the mode anyway.
        on_every_thread(|| ());
        flush_everywhere();
        assert!(flushing_on_this_thread());
        let seen = Mutex::new(vec![]);
        on_every_thread(|| seen.lock().unwrap().push(flushing_on_this_thread()));
        let seen = seen.into_inner().unwrap();
        assert!(seen.len() >= 4, "{seen:?}");
        assert!(
            seen.iter().all(|&f| f),
            "a thread still computes denormals: {seen:?}"
        );
    }
}
