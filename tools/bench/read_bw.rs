//! A STREAM-like read test: the memory read bandwidth decode can reach on this machine, with the
//! given threads, each summing its own slice of a buffer far larger than the caches.
//!
//!     cargo run --release --example read_bw -- [THREADS] [MIB]     (default 2 threads, 1024 MiB)
//!
//! Prints one JSON object: {"threads", "mib", "gb_per_s" (best of 7 passes), "median_gb_per_s"}.

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(v: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    unsafe {
        let mut acc = [_mm256_setzero_si256(); 4];
        let p = v.as_ptr() as *const __m256i;
        let n = v.len() / 16;
        for i in 0..n {
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_epi64(*a, _mm256_loadu_si256(p.add(4 * i + j)));
            }
        }
        let mut out = [0u64; 4];
        let s = _mm256_add_epi64(
            _mm256_add_epi64(acc[0], acc[1]),
            _mm256_add_epi64(acc[2], acc[3]),
        );
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
        out.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            + v[16 * n..].iter().fold(0u64, |a, b| a.wrapping_add(*b))
    }
}

fn sum(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // Safety: AVX2 was detected.
        return unsafe { sum_avx2(v) };
    }
    v.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: usize| -> usize {
        args.get(i).map_or(d, |s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("read_bw: {s:?} is not a count (usage: read_bw [THREADS] [MIB])");
                std::process::exit(2)
            })
        })
    };
    let (threads, mib) = (arg(1, 2).max(1), arg(2, 1024).max(64));
    let n = mib * (1 << 20) / 8;
    let v: Vec<u64> = (0..n as u64).collect();
    let chunk = n.div_ceil(threads);
    let mut rates = vec![];
    let mut check = 0u64;
    for _ in 0..7 {
        let t0 = Instant::now();
        let s: u64 = std::thread::scope(|sc| {
            let hs: Vec<_> = v.chunks(chunk).map(|c| sc.spawn(move || sum(c))).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .fold(0, u64::wrapping_add)
        });
        let dt = t0.elapsed().as_secs_f64();
        check ^= s;
        rates.push((n * 8) as f64 / dt / 1e9);
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "{{\"threads\": {threads}, \"mib\": {mib}, \"gb_per_s\": {:.2}, \"median_gb_per_s\": {:.2}, \"check\": {}}}",
        rates[rates.len() - 1],
        rates[rates.len() / 2],
        check & 1
    );
}
