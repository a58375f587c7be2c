//! Memory whose size a caller controls: allocated fallibly, or refused before the core runs.
//!
//! `vec![0; n]` aborts the interpreter when `n` cannot be allocated, and a broadcast NumPy
//! array makes any `n` cheap to ask for. Buffers this crate allocates go through
//! [`zeroed`]. The core allocates its working memory fallibly itself; what it takes per
//! thread is also probed here ([`check_attention`], [`check_linear`]), before any view is
//! made, so that a size no machine holds is refused as such even where a view of the same
//! arrays would be refused for its strides.

use ferroattn_core::{self as core, Error};

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

/// Working memory below this is not probed: a call's scratch is normally kilobytes, and the
/// core refuses what it cannot allocate itself.
const PROBE_FROM: usize = 256 << 20;

/// Refuses a call whose working memory (`bytes`; `None`: it overflows) cannot be allocated,
/// before the views of its arrays are made (the core would refuse it too, once they are).
fn probe(bytes: Option<usize>, what: &str) -> Result<(), Error> {
    match bytes {
        Some(b) if b < PROBE_FROM => Ok(()),
        Some(b) if Vec::<u8>::new().try_reserve_exact(b).is_ok() => Ok(()),
        _ => Err(refusal(what, bytes)),
    }
}

/// Checks that the attention kernels' working memory (`ferroattn-core`'s own figure per
/// thread, on `threads` threads and the caller's) can be allocated for queries
/// `(B, Hq, Nq, D)`, `hkv` key/value heads and value dimension `dv`.
pub(crate) fn check_attention(q: [usize; 4], hkv: usize, dv: usize, threads: usize, what: &str) -> Result<(), Error> {
    let bytes = core::attention_scratch_bytes(q, hkv, dv);
    probe(bytes.and_then(|b| b.checked_mul(threads.checked_add(1)?)), what)
}

/// As [`check_attention`] for linear attention with head dimension `d` and value dimension
/// `dv`.
pub(crate) fn check_linear(d: usize, dv: usize, threads: usize, what: &str) -> Result<(), Error> {
    let bytes = core::linear_scratch_bytes(d, dv);
    probe(bytes.and_then(|b| b.checked_mul(threads.checked_add(1)?)), what)
}
