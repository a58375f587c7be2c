//! ferroattn's own rayon pool, so the host application's global pool (or its absence) is never
//! touched and the thread count can change at run time.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The most threads [`set_num_threads`] accepts: far more than any CPU has cores
/// (oversubscription past a few threads per core only adds switching), so a larger count is a
/// mistake, on which the pool would spend seconds starting threads.
pub const MAX_THREADS: usize = 4096;

static POOL: OnceLock<Mutex<Option<Arc<rayon::ThreadPool>>>> = OnceLock::new();
static THREADS: OnceLock<Mutex<usize>> = OnceLock::new();

fn default_threads() -> usize {
    std::env::var("FERROATTN_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0 && n <= MAX_THREADS)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn threads_cell() -> &'static Mutex<usize> {
    THREADS.get_or_init(|| Mutex::new(default_threads()))
}

fn pool_cell() -> &'static Mutex<Option<Arc<rayon::ThreadPool>>> {
    POOL.get_or_init(|| Mutex::new(None))
}

/// Threads the kernels use.
pub fn num_threads() -> usize {
    *threads_cell().lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets the number of threads (0 counts as 1); the pool is rebuilt on next use. More than
/// [`MAX_THREADS`] is an error.
pub fn set_num_threads(n: usize) -> Result<()> {
    if n > MAX_THREADS {
        return Err(Error::Value(format!("n must be at most {MAX_THREADS}, got {n}")));
    }
    let n = n.max(1);
    let mut t = threads_cell().lock().unwrap_or_else(|e| e.into_inner());
    if *t != n {
        *t = n;
        *pool_cell().lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    Ok(())
}

/// Forgets the pool without joining it: after `fork` its threads do not exist in the child, and
/// using (or dropping) it there would hang.
pub fn forget_pool_after_fork() {
    let mut p = pool_cell().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = p.take() {
        std::mem::forget(old);
    }
}

/// Runs `f(state, i)` for every `i` in `0..n`, on the caller's thread and `threads − 1` of
/// the pool's, each claiming the next index as it becomes free; `init` makes each thread's
/// state on its first index.
///
/// The caller starts at once instead of waiting for a worker: a worker that was idle (between
/// the decode steps of a model, say) can take a fraction of a millisecond to be scheduled
/// again, which a short call would otherwise spend waiting. For the same reason the caller
/// never sleeps waiting for a helper at the end: it waits only for helpers that are inside a
/// task, spinning, and returns without the ones that have not started (they find the call
/// closed and leave). A rayon scope instead parked the caller until every helper had run, and
/// a parked virtual CPU took 50–70 µs to come back after a 4096-token decode step here, and a
/// helper woken late held a call 1.3 ms past its work (`docs/performance.md`, "Caller's thread
/// in for_each").
pub(crate) fn for_each<T, I, F>(n: usize, init: I, f: F)
where
    I: Fn() -> T + Sync,
    F: Fn(&mut T, usize) + Sync,
{
    let work = |next: &AtomicUsize| {
        let mut state = None;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(state.get_or_insert_with(&init), i);
        }
    };
    let helpers = num_threads().min(n).saturating_sub(1);
    let pool = if helpers > 0 { pool() } else { None };
    let Some(pool) = pool else {
        return work(&AtomicUsize::new(0));
    };
    let work: &(dyn Fn(&AtomicUsize) + Sync) = &work;
    // SAFETY: only the lifetime is erased. A helper calls `work` only after registering in
    // `active` while `closed` was false, and this function closes the call and waits for
    // `active` to reach zero before `work` (and what it borrows) goes out of scope, also when
    // the caller's own share panics.
    let work = unsafe { std::mem::transmute::<&(dyn Fn(&AtomicUsize) + Sync), WorkPtr>(work) };
    let shared = Arc::new(Shared {
        next: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        panic: Mutex::new(None),
        work,
    });
    for _ in 0..helpers {
        let shared = Arc::clone(&shared);
        pool.spawn(move || shared.help());
    }
    // SAFETY: `work` is alive for the whole of this function.
    let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*shared.work)(&shared.next) }));
    shared.closed.store(true, Ordering::SeqCst);
    let start = Instant::now();
    let mut polls = 0u32;
    while shared.active.load(Ordering::SeqCst) > 0 {
        // A helper inside a task: spin (it returns within one task), yielding the CPU once
        // the wait gets long (prefill tasks, more threads than cores).
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) && start.elapsed() > SPIN_LIMIT {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    if let Err(p) = mine {
        std::panic::resume_unwind(p);
    }
    let helper_panic = shared.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = helper_panic {
        std::panic::resume_unwind(p);
    }
}

/// [`for_each`] for work that can fail: `init` (a thread's state) or `f` (one index). After
/// the first failure no further index runs (those already running finish), and that failure
/// is returned.
pub(crate) fn try_for_each<T, E, I, F>(n: usize, init: I, f: F) -> std::result::Result<(), E>
where
    E: Send,
    I: Fn() -> std::result::Result<T, E> + Sync,
    F: Fn(&mut T, usize) -> std::result::Result<(), E> + Sync,
{
    let failed = AtomicBool::new(false);
    let first = Mutex::new(None);
    let fail = |e: E| {
        failed.store(true, Ordering::Relaxed);
        first.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    };
    for_each(
        n,
        // The error is taken out of a failed state once, by the index that finds it.
        || init().map_err(Some),
        |state: &mut std::result::Result<T, Option<E>>, i| {
            if failed.load(Ordering::Relaxed) {
                return;
            }
            match state {
                Ok(state) => {
                    if let Err(e) = f(state, i) {
                        fail(e);
                    }
                }
                Err(e) => {
                    if let Some(e) = e.take() {
                        fail(e);
                    }
                }
            }
        },
    );
    match first.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// How long the caller spins for a helper still inside a task before it yields between polls.
const SPIN_LIMIT: Duration = Duration::from_millis(1);

/// The caller's claiming loop with its lifetime erased; see [`for_each`].
type WorkPtr = *const (dyn Fn(&AtomicUsize) + Sync + 'static);

/// What the caller of [`for_each`] and its helpers share. It is reference-counted so that a
/// helper scheduled after the call has returned still finds it, sees `closed`, and leaves
/// without touching `work`.
struct Shared {
    next: AtomicUsize,
    /// Helpers between registering and leaving.
    active: AtomicUsize,
    closed: AtomicBool,
    /// The first panic of a helper, raised on the caller's thread.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    work: WorkPtr,
}

// SAFETY: `work` points to a `Sync` closure and is only called under the protocol of
// `for_each`; the other fields are thread-safe.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn help(&self) {
        // Registering before looking at `closed` (both sequentially consistent): either the
        // caller sees this helper active and waits for it, or this helper sees the call closed.
        self.active.fetch_add(1, Ordering::SeqCst);
        if !self.closed.load(Ordering::SeqCst) {
            // SAFETY: the call is open, so `work` is alive until `active` drops back.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { (*self.work)(&self.next) }));
            if let Err(p) = r {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
            }
        }
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` inside the pool.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool() {
        Some(pool) => pool.install(f),
        // No threads to be had: run on the caller's thread.
        None => f(),
    }
}

/// The pool, built on first use (and again after [`set_num_threads`]); `None` when no thread
/// can be started.
fn pool() -> Option<Arc<rayon::ThreadPool>> {
    let pool = {
        let n = num_threads();
        let mut p = pool_cell().lock().unwrap_or_else(|e| e.into_inner());
        match &*p {
            Some(pool) => Arc::clone(pool),
            None => {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .thread_name(|i| format!("ferroattn-{i}"))
                    .build()
                    .map(Arc::new);
                match pool {
                    Ok(pool) => {
                        *p = Some(Arc::clone(&pool));
                        pool
                    }
                    Err(_) => return None,
                }
            }
        }
    };
    Some(pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::panic::catch_unwind;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    fn two_threads() {
        set_num_threads(num_threads().max(2)).unwrap();
    }

    #[test]
    fn every_index_runs_once_including_calls_helpers_start_late_for() {
        two_threads();
        // Many tiny calls: helpers often start after the caller has taken every index.
        for n in (1..40).chain([1000]).cycle().take(2000) {
            let seen: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for_each(
                n,
                || (),
                |_, i| {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                },
            );
            assert!(seen.iter().all(|c| c.load(Ordering::Relaxed) == 1), "n = {n}");
        }
    }

    #[test]
    fn a_call_does_not_wait_for_helpers_that_have_not_started() {
        two_threads();
        // Every worker busy until released: the helpers of the call below cannot start.
        let pool = pool().expect("a pool");
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        for _ in 0..pool.current_num_threads() {
            let gate = Arc::clone(&gate);
            pool.spawn(move || {
                let _ = gate.lock().unwrap().recv();
            });
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || done_tx.send(sum_of_indices(10)).unwrap());
        // The caller ran every index itself and returned while its helpers were still queued.
        let got = done_rx.recv_timeout(std::time::Duration::from_secs(20));
        for _ in 0..pool.current_num_threads() {
            release.send(()).unwrap();
        }
        assert_eq!(got, Ok(45));
    }

    #[test]
    fn a_panic_at_any_index_reaches_the_caller() {
        two_threads();
        // The first, an early and the last index: which thread runs each varies by call.
        for bad in [0, 5, 63] {
            let r = catch_unwind(|| {
                for_each(
                    64,
                    || (),
                    |_, i| {
                        if i == bad {
                            panic!("index {i}");
                        }
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    },
                )
            });
            assert!(r.is_err(), "index {bad}");
        }
        // The pool still works afterwards.
        assert_eq!(sum_of_indices(100), 4950);
    }

    #[test]
    fn a_failure_stops_the_work_and_is_returned() {
        two_threads();
        let ran = AtomicUsize::new(0);
        let r = try_for_each(
            1000,
            || Ok::<_, usize>(()),
            |_, i| {
                ran.fetch_add(1, Ordering::Relaxed);
                if i == 10 {
                    Err(i)
                } else {
                    Ok(())
                }
            },
        );
        assert_eq!(r, Err(10));
        assert!(ran.load(Ordering::Relaxed) < 1000);
        // A state that cannot be made fails the call too; without failures every index runs.
        assert_eq!(try_for_each(8, || Err::<(), _>("no state"), |_, _| Ok(())), Err("no state"));
        let sum = AtomicUsize::new(0);
        let ok = try_for_each(
            100,
            || Ok::<_, ()>(()),
            |_, i| {
                sum.fetch_add(i, Ordering::Relaxed);
                Ok(())
            },
        );
        assert_eq!((ok, sum.load(Ordering::Relaxed)), (Ok(()), 4950));
    }

    #[test]
    fn thread_counts_beyond_the_bound_are_refused() {
        let before = num_threads();
        assert!(set_num_threads(MAX_THREADS + 1).is_err());
        assert!(set_num_threads(usize::MAX).is_err());
        assert_eq!(num_threads(), before);
    }

    /// `0 + 1 + … + (n − 1)`, each index added by whichever thread runs it.
    fn sum_of_indices(n: usize) -> usize {
        let sum = AtomicUsize::new(0);
        for_each(
            n,
            || (),
            |_, i| {
                sum.fetch_add(i, Ordering::Relaxed);
            },
        );
        sum.load(Ordering::Relaxed)
    }
}
