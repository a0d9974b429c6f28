//! A small persistent thread pool for splitting a kernel's output rows inside one rank.
//!
//! Spawning threads per matrix product costs tens of microseconds, more than a decode step's
//! small products take, so the workers live for the whole process: they spin a little after each
//! job (decode issues products back to back), then sleep on a condition variable. One caller at
//! a time: a second concurrent caller (e.g. parallel tests) runs its tasks inline.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// A borrowed job, made `'static` only while [`Pool::run`] waits for it to finish.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}
// SAFETY: the pointee is `Sync` and outlives every use (run() waits for all workers).
unsafe impl Send for Job {}

struct Shared {
    epoch: AtomicU64,
    /// Workers still running the current job.
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    job: Mutex<Option<Job>>,
    wake: Condvar,
}

pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    caller: Mutex<()>,
}

/// Spins before a worker goes to sleep (~tens of microseconds).
const SPINS: u32 = 1 << 14;

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
        });
        for id in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("kernels-{id}"))
                .spawn(move || worker(&s, id, threads))
                .expect("cannot spawn a kernel thread");
        }
        Pool {
            threads,
            shared,
            caller: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..tasks)`; task `t` runs on thread `t % threads`. Returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = if self.threads > 1 && tasks > 1 {
            self.caller.try_lock().ok()
        } else {
            None
        };
        let Some(_guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        let s = &*self.shared;
        // SAFETY: only the lifetime is erased; we wait below until `pending` is 0, i.e. until
        // no worker can touch `f` any more, before returning.
        let f_static: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        s.pending.store(self.threads - 1, Ordering::SeqCst);
        {
            let mut j = s.job.lock().unwrap_or_else(|e| e.into_inner());
            *j = Some(Job { f: f_static, tasks });
            s.epoch.fetch_add(1, Ordering::SeqCst);
        }
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            s.wake.notify_all();
        }
        let mut t = 0;
        while t < tasks {
            f(t);
            t += self.threads;
        }
        // Spin briefly, then yield: on a loaded machine a worker may be waiting for a core.
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) > 0 {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn worker(s: &Shared, id: usize, threads: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        while s.epoch.load(Ordering::Acquire) == seen {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.job.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.epoch.load(Ordering::SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        let job = {
            let g = s.job.lock().unwrap_or_else(|e| e.into_inner());
            seen = s.epoch.load(Ordering::SeqCst);
            *g
        };
        if let Some(job) = job {
            // SAFETY: the caller keeps `f` alive until `pending` drops to 0 (below).
            let f = unsafe { &*job.f };
            let mut t = id;
            while t < job.tasks {
                f(t);
                t += threads;
            }
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

/// Threads for kernels in this process: `OMP_NUM_THREADS` (tprun sets it to the cores per
/// rank), else the CPUs this process may run on.
fn configured_threads() -> usize {
    if let Some(n) = std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n.min(256);
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

static POOL: OnceLock<Pool> = OnceLock::new();

/// The process-wide pool, started on first use.
pub fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::new(configured_threads()))
}
