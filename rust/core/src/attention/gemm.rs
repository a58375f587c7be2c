//! The register-blocked micro-kernel behind both products of a tile: `Sᵀ = K·Qᵀ` and
//! `O += P·V`.
//!
//! `MR` rows of A are broadcast against two vectors of B, so 2·MR accumulators stay in registers
//! while one row of B streams from L1; `MR = 6` fills the 16 registers of AVX2 (12 accumulators,
//! two B vectors, one broadcast). A is addressed by a row and a column stride, so a transposed
//! operand (Pᵀ) or rows read straight from the caller's array cost no copy.

use crate::simd::Simd;

/// Rows per micro-tile.
pub(crate) const MR: usize = 6;

/// `C[MR×n] (+)= A[MR×k] · B[k×n]` for exactly `MR` rows.
///
/// # Safety
/// `n` must be a multiple of `2·S::LANES`; every addressed element must be valid and C must
/// not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<S: Simd, const R: usize>(
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const f32,
    ldb: isize,
    c: *mut f32,
    ldc: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let l = S::LANES;
    for j in (0..n).step_by(2 * l) {
        let mut acc = [[S::zero(); 2]; R];
        // SAFETY: indices stay inside the extents the caller vouched for.
        unsafe {
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    let p = c.add(r * ldc + j);
                    row[0] = S::load(p);
                    row[1] = S::load(p.add(l));
                }
            }
            let mut ap = a;
            let mut bp = b.add(j);
            for _ in 0..k {
                let b0 = S::load(bp);
                let b1 = S::load(bp.add(l));
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = S::splat(*ap.offset(r as isize * a_rs));
                    row[0] = S::fma(av, b0, row[0]);
                    row[1] = S::fma(av, b1, row[1]);
                }
                ap = ap.offset(a_ks);
                bp = bp.offset(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                let p = c.add(r * ldc + j);
                S::store(p, row[0]);
                S::store(p.add(l), row[1]);
            }
        }
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`; A's element `(i, kk)` is at `a + i·a_rs + kk·a_ks`, B and C
/// are row-major with leading dimensions `ldb` and `ldc`.
///
/// # Safety
/// `n` must be a multiple of `2·S::LANES`; A, B and C must be valid for those extents, and C
/// must not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<S: Simd>(
    a: *const f32,
    a_rs: isize,
    a_ks: isize,
    b: *const f32,
    ldb: isize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    debug_assert!(n.is_multiple_of(2 * S::LANES));
    let mut i = 0;
    // SAFETY: each call covers rows i..i + R of A and C, inside m.
    unsafe {
        while i + MR <= m {
            let (ai, ci) = (a.offset(i as isize * a_rs), c.add(i * ldc));
            block::<S, MR>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate);
            i += MR;
        }
        let (ai, ci) = (a.offset(i as isize * a_rs), c.add(i * ldc));
        match m - i {
            1 => block::<S, 1>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            2 => block::<S, 2>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            3 => block::<S, 3>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            4 => block::<S, 4>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            5 => block::<S, 5>(ai, a_rs, a_ks, b, ldb, ci, ldc, n, k, accumulate),
            _ => {}
        }
    }
}
