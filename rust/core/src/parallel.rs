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

/// Runs `f` inside the pool.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
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
                    // No threads to be had: run on the caller's thread.
                    Err(_) => return f(),
                }
            }
        }
    };
    pool.install(f)
}
