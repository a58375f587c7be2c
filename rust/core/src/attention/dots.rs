//! Dot products of key rows with a few query rows, vectorized along the head dimension: the
//! score path for tiles with too few rows to fill the gemm's padded columns (decoding).
//!
//! Two layouts of the scores: transposed (`Sᵀ`, one key per row, as the blocked path and the
//! masks expect) and row-major (`S`, one query per row, for the few-rows path that keeps its
//! softmax along keys). Both keep `R·KB` independent accumulators in registers, with `R` and
//! `KB` constants so each shape is its own unrolled kernel.

use crate::simd::{elem::Elem, row_ptrs, Prefetch, Simd};

/// `Sᵀ[j, r] = K[j]·Q[r]` for the first `R` rows, vectorized along D, `KB` keys at a time so
/// `R·KB` independent accumulators hide the FMA latency.
///
/// # Safety
/// `k` holds `kn` rows of `d` floats `ldk` apart, `q` holds `R` rows of `d`, `st` holds
/// `kn × ld_st` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_kb<S: Simd, E: Elem, const R: usize, const KB: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    j0: usize,
    pf: Prefetch,
) {
    let l = S::LANES;
    let body = d - d % l;
    // SAFETY: indices stay inside the extents the caller vouched for.
    unsafe {
        let kr = row_ptrs::<E, KB>(k, ldk, j0);
        // Keys are streamed once: ask for the rows a few steps ahead, and for the companion rows
        // (values of the same keys) the caller names.
        Prefetch::of(k, ldk, d).rows(j0 + 8, KB);
        pf.rows(j0, KB);
        let mut acc = [[S::zero(); R]; KB];
        for c in (0..body).step_by(l) {
            // Plain loops, not `array::from_fn` (see `gemm`).
            let mut kv = [S::zero(); KB];
            for (x, p) in kv.iter_mut().zip(&kr) {
                *x = E::load::<S>(p.add(c));
            }
            for r in 0..R {
                let qv = S::load(q.add(r * d + c));
                for (a, &k) in acc.iter_mut().zip(&kv) {
                    a[r] = S::fma(qv, k, a[r]);
                }
            }
        }
        for (t, (a, &kt)) in acc.iter().zip(&kr).enumerate() {
            for (r, &ar) in a.iter().enumerate() {
                let mut x = S::reduce_sum(ar);
                for c in body..d {
                    x += *q.add(r * d + c) * (*kt.add(c)).to_f32();
                }
                *st.add((j0 + t) * ld_st + r) = x;
            }
        }
    }
}

/// [`dots_kb`] over keys `0..kn`.
///
/// # Safety
/// As for [`dots_kb`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dots<S: Simd, E: Elem, const R: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    kn: usize,
    pf: Prefetch,
) {
    // Keep R·KB accumulators within the 16 registers of AVX2 alongside the loads.
    const { assert!(R <= 4) };
    let mut j = 0;
    // SAFETY: forwarded; every call covers keys inside 0..kn.
    unsafe {
        if R <= 2 {
            while j + 4 <= kn {
                dots_kb::<S, E, R, 4>(k, ldk, q, d, st, ld_st, j, pf);
                j += 4;
            }
        } else {
            while j + 2 <= kn {
                dots_kb::<S, E, R, 2>(k, ldk, q, d, st, ld_st, j, pf);
                j += 2;
            }
        }
        while j < kn {
            dots_kb::<S, E, R, 1>(k, ldk, q, d, st, ld_st, j, pf);
            j += 1;
        }
    }
}

/// [`dots`] for rows `from..to`, one at a time.
///
/// # Safety
/// As for [`dots`], with `to` rows in `q`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn dots_from<S: Simd, E: Elem>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    kn: usize,
    from: usize,
    to: usize,
    pf: Prefetch,
) {
    for r in from..to {
        // SAFETY: row r of q and column r of st are in range.
        unsafe { dots::<S, E, 1>(k, ldk, q.add(r * d), d, st.add(r), ld_st, kn, pf) };
    }
}

/// `S[r, j] = Q[r]·K[j]` for `rows` rows into `st` (row-major, `ld` apart), in passes of as
/// many rows as keep their accumulators in registers; `pf` requests the key rows ahead during
/// the first pass.
///
/// # Safety
/// `k` holds `kn` rows of `d` elements `ldk` apart, `q` `rows` rows of `d` floats; `rows · ld`
/// floats fit in `st`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores_rows<S: Simd, E: Elem>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld: usize,
    rows: usize,
    kn: usize,
    pf: Prefetch,
) {
    // Four keys of R rows take 4·R accumulators and four key vectors: R = 4 fits the 32
    // registers of AVX-512 and NEON, R = 2 the 16 of AVX2.
    let pass = if S::REGISTERS >= 32 { 4 } else { 2 };
    for (r0, m, pf) in pf.passes(rows, pass) {
        // SAFETY: rows r0..r0 + m of Q and of S are in range.
        unsafe {
            let (q, st) = (q.add(r0 * d), st.add(r0 * ld));
            match m {
                1 => dots_rows::<S, E, 1>(k, ldk, q, d, st, ld, kn, pf),
                2 => dots_rows::<S, E, 2>(k, ldk, q, d, st, ld, kn, pf),
                3 => dots_rows::<S, E, 3>(k, ldk, q, d, st, ld, kn, pf),
                _ => dots_rows::<S, E, 4>(k, ldk, q, d, st, ld, kn, pf),
            }
        }
    }
}

/// [`scores_rows`] for exactly `R` rows: four keys at a time, then one.
///
/// # Safety
/// As for [`scores_rows`], with `R` rows at `q` and `st`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_rows<S: Simd, E: Elem, const R: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) {
    let l = S::LANES;
    let body = d - d % l;
    // Columns past the vector body, in plain arithmetic, added to the stored sums.
    let tail = |j: usize, r: usize| -> f32 {
        // SAFETY: key j < kn and row r < R are in range, columns body..d too.
        unsafe {
            let kr = k.offset(j as isize * ldk);
            (body..d).map(|c| *q.add(r * d + c) * (*kr.add(c)).to_f32()).sum()
        }
    };
    let mut j = 0;
    // SAFETY: every pointer below stays inside the extents the caller vouched for.
    unsafe {
        while j + 4 <= kn {
            pf.ahead(j, 4);
            let kr = row_ptrs::<E, 4>(k, ldk, j);
            let mut acc = [[S::zero(); 4]; R];
            if R == 1 {
                // One row has no query vector to share between keys: read each key row whole,
                // in address order, which the hardware prefetchers follow (reading four rows
                // a column at a time halved what they fetched on Zen 4).
                for (t, p) in kr.iter().enumerate() {
                    for c in (0..body).step_by(l) {
                        acc[0][t] = S::fma(S::load(q.add(c)), E::load::<S>(p.add(c)), acc[0][t]);
                    }
                }
            } else {
                for c in (0..body).step_by(l) {
                    // Plain loops, not `array::from_fn` (see `gemm`).
                    let mut kv = [S::zero(); 4];
                    for (x, p) in kv.iter_mut().zip(&kr) {
                        *x = E::load::<S>(p.add(c));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = S::load(q.add(r * d + c));
                        for (x, &kt) in a.iter_mut().zip(&kv) {
                            *x = S::fma(qv, kt, *x);
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let out = st.add(r * ld + j);
                S::store_sums4(a[0], a[1], a[2], a[3], out);
                if body < d {
                    for t in 0..4 {
                        *out.add(t) += tail(j + t, r);
                    }
                }
            }
            j += 4;
        }
        while j < kn {
            let kr = k.offset(j as isize * ldk);
            let mut acc = [S::zero(); R];
            for c in (0..body).step_by(l) {
                let kv = E::load::<S>(kr.add(c));
                for (r, x) in acc.iter_mut().enumerate() {
                    *x = S::fma(S::load(q.add(r * d + c)), kv, *x);
                }
            }
            for (r, &x) in acc.iter().enumerate() {
                *st.add(r * ld + j) = S::reduce_sum(x) + tail(j, r);
            }
            j += 1;
        }
    }
}
