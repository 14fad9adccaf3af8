//! A small fork-join thread pool for the hot loops.
//!
//! Decode runs a few hundred short parallel regions per token, so dispatch must cost well under a
//! microsecond: workers spin on an epoch counter for a while and only then sleep on a condvar.
//! `run` broadcasts one closure to every thread (the caller is thread 0) and returns when all
//! are done; closures split their work statically by thread id.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    epoch: AtomicUsize,
    done: AtomicUsize,
    sleepers: AtomicUsize,
    stop: AtomicBool,
    job: UnsafeCell<Option<Job>>,
    lock: Mutex<()>,
    cv: Condvar,
}

// The job pointer is written only by the dispatching thread while no worker reads it
// (between epochs), and read by workers only after they observe the new epoch.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    n: usize,
    shared: Arc<Shared>,
    busy: AtomicBool,
    handles: Vec<std::thread::JoinHandle<()>>,
}

const SPIN_ITERS: usize = 1 << 17;

impl Pool {
    pub fn new(n: usize) -> Pool {
        let n = n.max(1);
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let handles = (1..n)
            .map(|tid| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("elastica-{tid}"))
                    .spawn(move || worker(s, tid))
                    .expect("spawn worker thread")
            })
            .collect();
        Pool {
            n,
            shared,
            busy: AtomicBool::new(false),
            handles,
        }
    }

    pub fn threads(&self) -> usize {
        self.n
    }

    /// Runs `f(tid)` for tid in 0..threads(), in parallel, and waits for all.
    /// A nested or concurrent call runs the closure serially on the calling thread.
    pub fn run<F: Fn(usize) + Sync>(&self, f: F) {
        if self.n == 1 || self.busy.swap(true, Ordering::Acquire) {
            // Single thread, or re-entrant use: run every share here.
            for t in 0..self.n {
                f(t);
            }
            return;
        }
        let s = &*self.shared;
        let job: &(dyn Fn(usize) + Sync) = &f;
        // Erase the lifetime: we do not return before every worker has finished with it.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap();
            s.cv.notify_all();
        }
        f(0);
        let mut spins = 0usize;
        while s.done.load(Ordering::Acquire) != self.n - 1 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        self.busy.store(false, Ordering::Release);
    }

    /// Splits `0..n` into `threads()` contiguous parts aligned to `align` and runs `f(range)`.
    pub fn for_range<F: Fn(std::ops::Range<usize>) + Sync>(&self, n: usize, align: usize, f: F) {
        let t = self.n;
        if t == 1 || n <= align {
            f(0..n);
            return;
        }
        self.run(|tid| {
            let r = split(n, t, tid, align);
            if !r.is_empty() {
                f(r);
            }
        });
    }
}

/// The `tid`-th of `parts` contiguous pieces of `0..n`, boundaries rounded to `align`.
pub fn split(n: usize, parts: usize, tid: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let a = units * tid / parts;
    let b = units * (tid + 1) / parts;
    (a * align).min(n)..(b * align).min(n)
}

fn worker(s: Arc<Shared>, tid: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0usize;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            if s.stop.load(Ordering::Relaxed) {
                return;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let mut g = s.lock.lock().unwrap();
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while s.epoch.load(Ordering::SeqCst) == seen && !s.stop.load(Ordering::SeqCst) {
                    g = s.cv.wait(g).unwrap();
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                drop(g);
                spins = 0;
            }
        }
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let job = unsafe { (*s.job.get()).expect("job set before epoch") };
        unsafe { (*job)(tid) };
        s.done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap();
            self.shared.cv.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// Sets the global thread count; only the first call (before any kernel runs) takes effect.
pub fn init(threads: usize) -> &'static Pool {
    POOL.get_or_init(|| Pool::new(threads))
}

/// The global pool (all cores by default).
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        Pool::new(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn runs_every_share_once() {
        let p = Pool::new(3);
        for _ in 0..1000 {
            let c = AtomicUsize::new(0);
            p.run(|t| {
                c.fetch_add(1 << (8 * t), Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 1 + (1 << 8) + (1 << 16));
        }
    }
    #[test]
    fn split_covers_range() {
        for n in [0, 1, 7, 64, 100, 1000] {
            let mut next = 0;
            for t in 0..3 {
                let r = split(n, 3, t, 16);
                assert_eq!(r.start, next.min(n).max(r.start.min(next)));
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
}
