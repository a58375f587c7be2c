//! The register-blocked micro-kernel behind both products of a tile: `S = Q·Kᵀ` (with K packed
//! transposed) and `O += P·V`.
//!
//! `MR` rows of A are broadcast against two vectors of B, so 2·MR accumulators stay in registers
//! while one row of B streams from L1; `MR = 6` fills the 16 registers of AVX2 (12 accumulators,
//! two B vectors, one broadcast).

use crate::simd::Simd;

pub(crate) const MR: usize = 6;

/// `C[m×n] (+)= A[m×k] · B[k×n]`, all row-major with the given leading dimensions.
///
/// # Safety
/// `m` must be a multiple of [`MR`] and `n` of `2·S::LANES`; A, B and C must be valid for those
/// extents, and C must not overlap A or B.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<S: Simd>(
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let l = S::LANES;
    debug_assert!(m % MR == 0 && n % (2 * l) == 0);
    for i in (0..m).step_by(MR) {
        for j in (0..n).step_by(2 * l) {
            let mut acc = [[S::zero(); 2]; MR];
            // SAFETY (whole block): indices stay inside the extents the caller vouched for.
            unsafe {
                if accumulate {
                    for (r, row) in acc.iter_mut().enumerate() {
                        let p = c.add((i + r) * ldc + j);
                        row[0] = S::load(p);
                        row[1] = S::load(p.add(l));
                    }
                }
                for kk in 0..k {
                    let bp = b.add(kk * ldb + j);
                    let b0 = S::load(bp);
                    let b1 = S::load(bp.add(l));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let av = S::splat(*a.add((i + r) * lda + kk));
                        row[0] = S::fma(av, b0, row[0]);
                        row[1] = S::fma(av, b1, row[1]);
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    let p = c.add((i + r) * ldc + j);
                    S::store(p, row[0]);
                    S::store(p.add(l), row[1]);
                }
            }
        }
    }
}
