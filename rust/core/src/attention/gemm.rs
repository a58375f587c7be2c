//! The register-blocked micro-kernel behind both products of a tile: `Sᵀ = K·Qᵀ` and
//! `O += P·V`.
//!
//! `MR` rows of A are broadcast against two vectors of B, so 2·MR accumulators stay in registers
//! while one row of B streams from L1; `MR = 6` fills the 16 registers of AVX2 (12 accumulators,
//! two B vectors, one broadcast). A is addressed by a row and a column stride, so a transposed
//! operand (Pᵀ) or rows read straight from the caller's array cost no copy.

use crate::simd::{elem::Elem, Simd};

/// Rows per micro-tile.
pub(crate) const MR: usize = 6;

/// `C[R×n] (+)= A[R×k] · B[k×n]` for exactly `R` rows, `NV` vectors of columns at a time,
/// then the remaining columns one vector at a time.
///
/// # Safety
/// `n` must be a multiple of `S::LANES`; every addressed element must be valid and C must not
/// overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<S: Simd, E: Elem, const R: usize, const NV: usize>(
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const E,
    ldb: isize,
    c: *mut f32,
    ldc: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let main = n - n % (NV * S::LANES);
    // SAFETY: both calls stay inside the columns 0..n the caller vouched for.
    unsafe {
        strips::<S, E, R, NV>(a, a_rs, a_ks, b, ldb, c, ldc, 0, main, k, accumulate);
        strips::<S, E, R, 1>(a, a_rs, a_ks, b, ldb, c, ldc, main, n, k, accumulate);
    }
}

/// Columns `j0..j1` of [`block`] in strips of `NV` vectors (`j1 − j0` a multiple of them).
///
/// # Safety
/// As for [`block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strips<S: Simd, E: Elem, const R: usize, const NV: usize>(
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const E,
    ldb: isize,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
    k: usize,
    accumulate: bool,
) {
    let l = S::LANES;
    for j in (j0..j1).step_by(NV * l) {
        let mut acc = [[S::zero(); NV]; R];
        // SAFETY: indices stay inside the extents the caller vouched for.
        unsafe {
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = S::load(c.add(r * ldc + j + v * l));
                    }
                }
            }
            let mut ap = a;
            let mut bp = b.add(j);
            for _ in 0..k {
                // Plain loops, not `array::from_fn`: its closure is not always inlined into the
                // target-feature function, and an intrinsic called out of line is a slow call.
                let mut bv = [S::zero(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = E::load::<S>(bp.add(v * l));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = S::splat(*ap.offset(r as isize * a_rs));
                    for (x, &bx) in row.iter_mut().zip(&bv) {
                        *x = S::fma(av, bx, *x);
                    }
                }
                ap = ap.offset(a_ks);
                bp = bp.offset(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    S::store(c.add(r * ldc + j + v * l), *x);
                }
            }
        }
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`, B of element type `E` (widened in registers); A's element `(i, kk)` is at `a + i·a_rs + kk·a_ks`, B and C
/// are row-major with leading dimensions `ldb` and `ldc`.
///
/// # Safety
/// `n` must be a multiple of `S::LANES`; A, B and C must be valid for those extents, and C
/// must not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<S: Simd, E: Elem>(
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const E,
    ldb: isize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    debug_assert!(n.is_multiple_of(S::LANES));
    let mut i = 0;
    // SAFETY: each call covers rows i..i + R of A and C, inside m.
    unsafe {
        while i + MR <= m {
            let (ai, ci) = (a.offset(i as isize * a_rs), c.add(i * ldc));
            block::<S, E, MR, 2>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate);
            i += MR;
        }
        let (ai, ci) = (a.offset(i as isize * a_rs), c.add(i * ldc));
        // Fewer rows leave registers for wider strips: fewer passes over B, which matters when
        // B (a V tile while decoding) is streamed rather than reused. R·NV accumulators plus NV
        // B vectors plus a broadcast stay within AVX2's 16 registers with room for widening a
        // narrow B; one more and an accumulator spills, putting a store and a reload on its
        // dependency chain (measured: int8 decode 2× slower with 4 rows × 3 vectors).
        if S::LANES >= 16 {
            // AVX-512's 32 registers: strips of up to 8 vectors (a 128-wide head at once), so
            // each probability is broadcast once per key for the whole row.
            match m - i {
                1 => block::<S, E, 1, 8>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
                2 => block::<S, E, 2, 8>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
                3 => block::<S, E, 3, 6>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
                4 => block::<S, E, 4, 4>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
                5 => block::<S, E, 5, 4>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
                _ => {}
            }
            return;
        }
        match m - i {
            1 => block::<S, E, 1, 6>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            2 => block::<S, E, 2, 4>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            3 => block::<S, E, 3, 3>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            4 => block::<S, E, 4, 2>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            5 => block::<S, E, 5, 2>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            _ => {}
        }
    }
}
