//! ferroattn's own rayon pool, so the host application's global pool (or its absence) is never
//! touched and the thread count can change at run time.

use std::sync::{Arc, Mutex, OnceLock};

static POOL: OnceLock<Mutex<Option<Arc<rayon::ThreadPool>>>> = OnceLock::new();
static THREADS: OnceLock<Mutex<usize>> = OnceLock::new();

fn default_threads() -> usize {
    std::env::var("FERROATTN_NUM_THREADS")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
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

/// Sets the number of threads (at least 1); the pool is rebuilt on next use.
pub fn set_num_threads(n: usize) {
    let n = n.max(1);
    let mut t = threads_cell().lock().unwrap_or_else(|e| e.into_inner());
    if *t != n {
        *t = n;
        *pool_cell().lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
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
/// again, which a short call would otherwise spend waiting, twice (the worker woken to start,
/// the caller woken at the end).
pub(crate) fn for_each<T, I, F>(n: usize, init: I, f: F)
where
    I: Fn() -> T + Sync,
    F: Fn(&mut T, usize) + Sync,
{
    let next = std::sync::atomic::AtomicUsize::new(0);
    let run = || {
        let mut state = None;
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(state.get_or_insert_with(&init), i);
        }
    };
    let helpers = num_threads().min(n).saturating_sub(1);
    if helpers == 0 {
        return run();
    }
    let Some(pool) = pool() else { return run() };
    pool.in_place_scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| run());
        }
        run();
    });
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
        set_num_threads(num_threads().max(2));
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
        let sum = AtomicUsize::new(0);
        for_each(
            100,
            || (),
            |_, i| {
                sum.fetch_add(i, Ordering::Relaxed);
            },
        );
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }
}
