//! A small fork-join thread pool for the hot loops.
//!
//! Decode runs a few hundred short parallel regions per token, so dispatch must cost well under a
//! microsecond, and it must not collapse when the machine is busy or threads outnumber cores:
//! - Work is split into chunks that threads claim dynamically (one atomic word holds the epoch
//!   and the next chunk), so a descheduled thread delays only the chunk it holds; the others take
//!   the rest. The caller is thread 0 and claims chunks too.
//! - Every wait spins briefly, then yields, then parks on a condvar (as llama.cpp's threadpool
//!   and OpenMP's `GOMP_SPINCOUNT` do), so a waiter never burns a time slice that a descheduled
//!   peer needs.
//!
//! Results do not depend on which thread runs a chunk: chunk bounds depend only on `n`, `align`
//! and `threads()`, never on timing.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// `f(tid, chunk)`: the thread that runs it, and the chunk index.
type Job = *const (dyn Fn(usize, usize) + Sync);

// The state word: epoch (32 bits) | broadcast (1) | chunk count (15) | next chunk (16).
const COUNT_BITS: u32 = 15;
const MAX_CHUNKS: usize = (1 << COUNT_BITS) - 1;
const BROADCAST: u64 = 1 << 31;

fn pack(epoch: u32, broadcast: bool, count: usize, next: usize) -> u64 {
    ((epoch as u64) << 32)
        | if broadcast { BROADCAST } else { 0 }
        | ((count as u64) << 16)
        | next as u64
}
fn epoch_of(s: u64) -> u32 {
    (s >> 32) as u32
}
fn count_of(s: u64) -> usize {
    ((s >> 16) & MAX_CHUNKS as u64) as usize
}
fn next_of(s: u64) -> usize {
    (s & 0xffff) as usize
}

/// How long a waiter spins, then yields, before it parks.
const SPIN: Duration = Duration::from_micros(50);
const YIELD: Duration = Duration::from_micros(200);
/// Chunks per thread for dynamic balancing.
const CHUNKS_PER_THREAD: usize = 4;

struct Shared {
    state: AtomicU64,
    /// Chunks finished in the current epoch (broadcast: workers finished).
    done: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    stop: AtomicBool,
    /// Parked workers, and their condvar.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
    /// The caller parked waiting for `done`, and its condvar.
    caller_parked: AtomicBool,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    /// The first panic of a job in this epoch, re-raised on the caller once every chunk is done.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

thread_local! {
    /// Set on pool workers, and on the caller while it dispatches.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// Releases `busy` however `dispatch` ends.
struct Busy<'a>(&'a AtomicBool);
impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Runs one share of a job; a panic is kept for the caller instead of unwinding through the pool.
fn run_share(s: &Shared, f: &(dyn Fn(usize, usize) + Sync), tid: usize, c: usize) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(tid, c))) {
        let mut slot = s.panic.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(p);
    }
}

// The job pointer is written only by the dispatching thread before it publishes a new epoch, and
// read by a worker only after it has claimed a chunk of (or joined the broadcast of) that epoch;
// the dispatcher does not return, nor publish another epoch, before every claimed chunk is done.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

pub struct Pool {
    n: usize,
    shared: Arc<Shared>,
    busy: AtomicBool,
    handles: Vec<std::thread::JoinHandle<()>>,
}

/// Spin, then yield, then park until `ready()`; `park` blocks once (and may return spuriously).
fn wait(ready: impl Fn() -> bool, mut park: impl FnMut()) {
    let start = Instant::now();
    let mut i = 0u32;
    loop {
        if ready() {
            return;
        }
        i = i.wrapping_add(1);
        if !i.is_multiple_of(64) {
            std::hint::spin_loop();
            continue;
        }
        let e = start.elapsed();
        if e < SPIN {
            std::hint::spin_loop();
        } else if e < SPIN + YIELD {
            std::thread::yield_now();
        } else {
            park();
        }
    }
}

impl Pool {
    pub fn new(n: usize) -> Pool {
        let n = n.clamp(1, MAX_CHUNKS);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            caller_parked: AtomicBool::new(false),
            done_lock: Mutex::new(()),
            done_cv: Condvar::new(),
            panic: Mutex::new(None),
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

    /// Runs `f(tid, chunk)` for every chunk in `0..count` on the pool's threads (claimed
    /// dynamically) and waits for all. A nested or concurrent call runs serially on the caller
    /// (every chunk with tid 0: a tid is unique within one call only). A panic in `f` is
    /// re-raised here once every chunk has finished.
    pub fn chunks<F: Fn(usize, usize) + Sync>(&self, count: usize, f: F) {
        if count <= 1
            || count > MAX_CHUNKS
            || self.n == 1
            || self.busy.swap(true, Ordering::Acquire)
        {
            (0..count).for_each(|c| f(0, c));
            return;
        }
        let _busy = Busy(&self.busy);
        self.dispatch(count, false, &f);
    }

    /// Runs `f(tid)` once on every thread of the pool (the caller is thread 0) and waits for all;
    /// for per-thread set-up such as floating-point modes. Not from inside a pool job.
    pub fn broadcast<F: Fn(usize) + Sync>(&self, f: F) {
        if self.n == 1 {
            f(0);
            return;
        }
        assert!(
            !IN_JOB.get(),
            "Pool::broadcast called from inside a pool job (it would wait for itself)"
        );
        // Every worker must take part: wait for a concurrent user rather than run serially.
        while self.busy.swap(true, Ordering::Acquire) {
            std::thread::yield_now();
        }
        let _busy = Busy(&self.busy);
        let g = |tid: usize, _c: usize| f(tid);
        self.dispatch(self.n - 1, true, &g);
    }

    fn dispatch(&self, count: usize, broadcast: bool, f: &(dyn Fn(usize, usize) + Sync)) {
        let s = &*self.shared;
        IN_JOB.set(true);
        // Erase the lifetime: we do not return before every claimed chunk has finished.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync), Job>(f) };
        unsafe { *s.job.get() = Some(job) };
        s.done.store(0, Ordering::Relaxed);
        let epoch = epoch_of(s.state.load(Ordering::Relaxed)).wrapping_add(1);
        s.state
            .store(pack(epoch, broadcast, count, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        if broadcast {
            run_share(s, f, 0, 0);
        } else {
            claim(s, epoch, 0);
        }
        wait(
            || s.done.load(Ordering::SeqCst) == count,
            || {
                s.caller_parked.store(true, Ordering::SeqCst);
                let g = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
                if s.done.load(Ordering::SeqCst) != count {
                    let _ = s.done_cv.wait_timeout(g, Duration::from_millis(1));
                }
                s.caller_parked.store(false, Ordering::SeqCst);
            },
        );
        IN_JOB.set(false);
        let panic = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = panic {
            resume_unwind(p);
        }
    }

    /// Splits `0..n` into contiguous chunks aligned to `align` and runs `f(range)` on each.
    pub fn for_range<F: Fn(Range<usize>) + Sync>(&self, n: usize, align: usize, f: F) {
        self.for_chunks(n, align, |_, r| f(r));
    }

    /// Like `for_range`, also passing the thread id (`< threads()`) for per-thread scratch.
    pub fn for_chunks<F: Fn(usize, Range<usize>) + Sync>(&self, n: usize, align: usize, f: F) {
        let count = self.chunk_count(n, align);
        if count <= 1 {
            if n > 0 {
                f(0, 0..n);
            }
            return;
        }
        self.chunks(count, |tid, c| {
            let r = split(n, count, c, align);
            if !r.is_empty() {
                f(tid, r);
            }
        });
    }

    /// Runs `f(i)` for every `i` in `0..n`, in parallel.
    pub fn for_each<F: Fn(usize) + Sync>(&self, n: usize, f: F) {
        self.for_range(n, 1, |r| r.for_each(&f));
    }

    /// The number of chunks `for_range(n, align, ..)` uses.
    pub fn chunk_count(&self, n: usize, align: usize) -> usize {
        if self.n == 1 {
            return 1;
        }
        n.div_ceil(align.max(1))
            .min(self.n * CHUNKS_PER_THREAD)
            .min(MAX_CHUNKS)
    }
}

/// Claims and runs chunks of `epoch` until none is left.
fn claim(s: &Shared, epoch: u32, tid: usize) {
    let mut st = s.state.load(Ordering::Acquire);
    loop {
        if epoch_of(st) != epoch || st & BROADCAST != 0 || next_of(st) >= count_of(st) {
            return;
        }
        match s
            .state
            .compare_exchange_weak(st, st + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // Safety: the chunk is claimed, so its epoch's job stays set until it finishes.
                let f = unsafe { &*(*s.job.get()).expect("job set before epoch") };
                run_share(s, f, tid, next_of(st));
                finish(s, count_of(st));
                st = s.state.load(Ordering::Acquire);
            }
            Err(now) => st = now,
        }
    }
}

/// Counts one finished chunk and wakes the caller if it parked for the last one.
fn finish(s: &Shared, count: usize) {
    if s.done.fetch_add(1, Ordering::SeqCst) + 1 == count && s.caller_parked.load(Ordering::SeqCst)
    {
        let _g = s.done_lock.lock().unwrap_or_else(|e| e.into_inner());
        s.done_cv.notify_one();
    }
}

/// The `tid`-th of `parts` contiguous pieces of `0..n`, boundaries rounded to `align`.
pub fn split(n: usize, parts: usize, tid: usize, align: usize) -> Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let a = units * tid / parts;
    let b = units * (tid + 1) / parts;
    (a * align).min(n)..(b * align).min(n)
}

fn worker(s: Arc<Shared>, tid: usize) {
    IN_JOB.set(true);
    let mut seen = 0u32;
    loop {
        wait(
            || epoch_of(s.state.load(Ordering::Acquire)) != seen || s.stop.load(Ordering::Relaxed),
            || {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                while epoch_of(s.state.load(Ordering::SeqCst)) == seen
                    && !s.stop.load(Ordering::SeqCst)
                {
                    g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
            },
        );
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let st = s.state.load(Ordering::Acquire);
        seen = epoch_of(st);
        if st & BROADCAST != 0 {
            // Safety: the caller waits for every worker to finish a broadcast.
            let job = unsafe { &*(*s.job.get()).expect("job set before epoch") };
            run_share(&s, job, tid, 0);
            finish(&s, count_of(st));
        } else {
            // `claim` reads the job only after claiming a chunk of this epoch.
            claim(&s, seen, tid);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
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

/// The global pool (the physical cores by default).
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(default_threads()))
}

/// Logical CPUs this process may run on (affinity and cgroup quota included).
pub fn logical_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The default thread count: physical cores this process may run on (SMT siblings count once),
/// at most `logical_cpus()`, like llama.cpp's default.
pub fn default_threads() -> usize {
    physical_cores()
        .unwrap_or(usize::MAX)
        .min(logical_cpus())
        .max(1)
}

/// Distinct cores among the CPUs in this process's affinity list (Linux sysfs), if readable.
fn physical_cores() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?
        .trim()
        .to_string();
    let mut cores = std::collections::BTreeSet::new();
    for cpu in parse_cpu_list(&list)? {
        let p = format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list");
        match std::fs::read_to_string(p) {
            Ok(s) => cores.insert(s.trim().to_string()),
            Err(_) => cores.insert(cpu.to_string()),
        };
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// "0-3,8,10-11" -> [0, 1, 2, 3, 8, 10, 11].
fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut v = vec![];
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => v.extend(a.trim().parse::<usize>().ok()?..=b.trim().parse().ok()?),
            None => v.push(part.trim().parse().ok()?),
        }
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn runs_every_chunk_once() {
        for threads in [1, 2, 3, 5] {
            let p = Pool::new(threads);
            for n in [0, 1, 7, 64, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                p.for_range(n, 4, |r| {
                    assert!(r.start % 4 == 0);
                    r.for_each(|i| {
                        hits[i].fetch_add(1, Ordering::Relaxed);
                    })
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }
    #[test]
    fn broadcast_reaches_every_thread() {
        let p = Pool::new(3);
        for _ in 0..1000 {
            let c = AtomicUsize::new(0);
            p.broadcast(|t| {
                c.fetch_add(1 << (8 * t), Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 1 + (1 << 8) + (1 << 16));
        }
    }
    #[test]
    fn oversubscribed_and_parked_pools_finish() {
        // More threads than cores, with pauses long enough that workers park between regions.
        let p = Pool::new(4 * logical_cpus());
        let sum = AtomicUsize::new(0);
        for k in 0..200 {
            p.for_each(100, |i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            if k % 50 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert_eq!(sum.load(Ordering::Relaxed), 200 * 4950);
    }
    #[test]
    fn nested_call_runs_serially() {
        let p = Pool::new(2);
        let c = AtomicUsize::new(0);
        p.for_each(8, |_| {
            p.for_each(8, |_| {
                c.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(c.load(Ordering::Relaxed), 64);
    }
    #[test]
    fn a_panicking_job_reaches_the_caller_and_the_pool_survives() {
        let p = Pool::new(3);
        for bad in [0, 5, 11] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                p.for_each(12, |i| assert!(i != bad, "job {i} fails"));
            }));
            let msg = r.unwrap_err();
            let msg = msg.downcast_ref::<String>().unwrap();
            assert!(msg.contains(&format!("job {bad} fails")), "{msg}");
            // The pool still runs in parallel (not stuck busy), and broadcasts still return.
            let c = AtomicUsize::new(0);
            p.broadcast(|_| {
                c.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(c.load(Ordering::Relaxed), 3);
        }
    }
    #[test]
    fn broadcast_inside_a_job_is_refused() {
        let p = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| p.for_each(4, |_| p.broadcast(|_| ()))));
        assert!(r.is_err());
        p.broadcast(|_| ());
    }
    #[test]
    fn split_covers_range() {
        for n in [0, 1, 7, 64, 100, 1000] {
            let mut next = 0;
            for t in 0..3 {
                let r = split(n, 3, t, 16);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }
    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("x"), None);
        assert!(default_threads() >= 1 && default_threads() <= logical_cpus());
    }
}
