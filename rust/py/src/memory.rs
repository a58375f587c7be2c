//! Memory whose size a caller controls: allocated fallibly, or refused before the core runs.
//!
//! `vec![0; n]` aborts the interpreter when `n` cannot be allocated, and a broadcast NumPy
//! array makes any `n` cheap to ask for. Buffers this crate allocates go through
//! [`zeroed`]; the core's per-worker scratch (sized by the head and value dimensions and the
//! query heads per key/value head) is estimated here and the call refused with
//! `Error::Memory` when that much cannot be had, until the core allocates fallibly itself.

use ferroattn_core::Error;

/// A vector of `n` default values, or `Error::Memory` naming `what` when it cannot be allocated.
pub(crate) fn zeroed<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>, Error> {
    let mut v = Vec::new();
    let bytes = n.checked_mul(size_of::<T>());
    if bytes.is_none() || v.try_reserve_exact(n).is_err() {
        return Err(refusal(what, bytes));
    }
    v.resize(n, T::default());
    Ok(v)
}

/// The product of `dims`, or `Error::Memory` naming `what` when it overflows.
pub(crate) fn count(dims: &[usize], what: &str) -> Result<usize, Error> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| refusal(what, None))
}

fn refusal(what: &str, bytes: Option<usize>) -> Error {
    let size = bytes.map_or_else(|| "more bytes than a 64-bit size holds".to_string(), |b| format!("{b} bytes"));
    Error::Memory(format!("{what}: cannot allocate the memory asked for ({size})"))
}

/// Working memory below this is not probed: a call's scratch is normally kilobytes, and an
/// allocation of this size that fails has left the process in trouble anyway.
const PROBE_FROM: usize = 256 << 20;

/// Refuses a call whose working memory (`bytes`; `None`: it overflows) cannot be allocated:
/// the core would abort allocating it.
fn probe(bytes: Option<usize>, what: &str) -> Result<(), Error> {
    match bytes {
        Some(b) if b < PROBE_FROM => Ok(()),
        Some(b) if Vec::<u8>::new().try_reserve_exact(b).is_ok() => Ok(()),
        _ => Err(refusal(what, bytes)),
    }
}

fn round_up(x: usize, m: usize) -> Option<usize> {
    x.checked_next_multiple_of(m)
}

/// Checks that the blocked attention kernels' buffers can be allocated for queries
/// `(B, Hq, Nq, D)`, `hkv` key/value heads and value dimension `dv`, on `threads` workers.
///
/// An upper bound after `ferroattn-core`'s `attention::Plan` and `blocked::Scratch` (64 query
/// rows per task, 128 keys per tile, rows padded to 32), its split-K partial results, and its
/// lists of sequences (one per batch entry) and tasks (per sequence, KV head and query tile).
pub(crate) fn check_attention(q: [usize; 4], hkv: usize, dv: usize, threads: usize, what: &str) -> Result<(), Error> {
    let [b, hq, nq, d] = q;
    let estimate = || -> Option<usize> {
        let group = hq.checked_div(hkv)?.max(1);
        let tq = (64 / group).max(1).min(nq.max(1));
        let rows = round_up(group.checked_mul(tq)?, 32)?;
        let (dvp, keys) = (round_up(dv, 32)?, 128usize);
        let per_row = d.checked_mul(3)?.checked_add(keys)?.checked_add(dvp)?.checked_add(16)?;
        let tiles = keys.checked_mul(d.checked_add(dvp)?.checked_add(8)?)?.checked_add(d.max(dv))?;
        let worker = rows.checked_mul(per_row)?.checked_add(tiles)?;
        let partials = threads.checked_mul(8)?.checked_mul(rows)?.checked_mul(dv.checked_add(2)?)?;
        let floats = threads.checked_add(1)?.checked_mul(worker)?.checked_add(partials)?.checked_mul(4)?;
        // Sequences of 5 words; tasks of 4 words, grown by doubling, plus an order of 1 word.
        let tasks = b.checked_mul(hkv)?.checked_mul(nq.div_ceil(tq).max(1))?.checked_mul(9 * 8)?;
        floats.checked_add(b.checked_mul(5 * 8)?)?.checked_add(tasks)
    };
    probe(estimate(), what)
}

/// As [`check_attention`] for linear attention: `ferroattn-core`'s per-worker `linear::Scratch`
/// (64-token chunks) and its `(units + 4·threads)` states of `D × (Dv + 1)` (padded to 16).
pub(crate) fn check_linear(q: [usize; 4], hkv: usize, dv: usize, threads: usize, what: &str) -> Result<(), Error> {
    let [b, _, _, d] = q;
    let estimate = || -> Option<usize> {
        let (chunk, dvp) = (64usize, round_up(dv.checked_add(1)?, 16)?);
        let units = b.checked_mul(hkv)?;
        let states = units.checked_add(threads.checked_mul(4)?)?.checked_mul(d.checked_mul(dvp)?)?;
        let worker = d.checked_mul(3)?.checked_add(dvp.checked_mul(2)?)?.checked_add(chunk)?.checked_mul(chunk)?;
        let worker = worker.checked_add(d.max(dv))?;
        threads.checked_add(1)?.checked_mul(worker)?.checked_add(states)?.checked_mul(4)
    };
    probe(estimate(), what)
}
