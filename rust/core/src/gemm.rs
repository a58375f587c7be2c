//! The register-blocked micro-kernel behind every product of the crate: an attention tile's
//! `Sᵀ = K·Qᵀ` and `O += P·V`, and linear attention's chunk and state products.
//!
//! `MR` rows of A are broadcast against two vectors of B (four on AVX-512), so 2·MR (4·MR)
//! accumulators stay in registers while one row of B streams from L1; `MR = 6` fills the 16
//! registers of AVX2 (12 accumulators, two B vectors, one broadcast) and most of AVX-512's 32.
//! A is addressed by a row and a column stride, so a transposed operand (Pᵀ) or rows read
//! straight from the caller's array cost no copy. The operands travel as small `Copy` structs
//! ([`A`], [`B`], [`C`]) that the `#[inline(always)]` chain dissolves back into registers.

use crate::simd::{elem::Elem, Prefetch, Simd};

/// The left operand, f32: element `(i, kk)` at `p + i·rs + kk·ks`.
#[derive(Clone, Copy)]
pub(crate) struct A {
    pub p: *const f32,
    pub rs: isize,
    pub ks: isize,
}

impl A {
    /// A row-major matrix with rows `ld` apart.
    #[inline(always)]
    pub(crate) fn rows(p: *const f32, ld: usize) -> A {
        A { p, rs: ld as isize, ks: 1 }
    }

    /// The transpose of a row-major matrix with rows `ld` apart (element `(i, kk)` at
    /// `p + kk·ld + i`).
    #[inline(always)]
    pub(crate) fn transposed(p: *const f32, ld: usize) -> A {
        A { p, rs: 1, ks: ld as isize }
    }

    /// The operand from row `i` on.
    ///
    /// # Safety
    /// Row `i` must lie inside the operand.
    #[inline(always)]
    unsafe fn at_row(self, i: usize) -> A {
        // SAFETY: forwarded.
        A { p: unsafe { self.p.offset(i as isize * self.rs) }, ..self }
    }
}

/// The right operand: row-major rows of `E` (widened in registers), `ld` elements apart.
#[derive(Clone, Copy)]
pub(crate) struct B<E> {
    pub p: *const E,
    pub ld: isize,
}

impl<E> B<E> {
    #[inline(always)]
    pub(crate) fn new(p: *const E, ld: isize) -> B<E> {
        B { p, ld }
    }
}

/// The f32 result, row-major with rows `ld` apart.
#[derive(Clone, Copy)]
pub(crate) struct C {
    pub p: *mut f32,
    pub ld: usize,
}

impl C {
    #[inline(always)]
    pub(crate) fn new(p: *mut f32, ld: usize) -> C {
        C { p, ld }
    }

    /// The result from row `i` on.
    ///
    /// # Safety
    /// Row `i` must lie inside the result.
    #[inline(always)]
    unsafe fn at_row(self, i: usize) -> C {
        // SAFETY: forwarded.
        C { p: unsafe { self.p.add(i * self.ld) }, ..self }
    }
}

/// Rows per micro-tile.
pub(crate) const MR: usize = 6;

/// `C[R×n] (+)= A[R×k] · B[k×n]` for exactly `R` rows, `NV` vectors of columns at a time,
/// then the remaining columns one vector at a time.
///
/// # Safety
/// `n` must be a multiple of `S::LANES`; every addressed element must be valid and C must not
/// overlap A or B.
#[inline(always)]
unsafe fn block<S: Simd, E: Elem, const R: usize, const NV: usize>(
    a: A,
    b: B<E>,
    c: C,
    n: usize,
    k: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let main = n - n % (NV * S::LANES);
    // SAFETY: both calls stay inside the columns 0..n the caller vouched for.
    unsafe {
        strips::<S, E, R, NV>(a, b, c, 0, main, k, accumulate, pf);
        strips::<S, E, R, 1>(a, b, c, main, n, k, accumulate, pf);
    }
}

/// Columns `j0..j1` of [`block`] in strips of `NV` vectors (`j1 − j0` a multiple of them).
///
/// # Safety
/// As for [`block`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strips<S: Simd, E: Elem, const R: usize, const NV: usize>(
    a: A,
    b: B<E>,
    c: C,
    j0: usize,
    j1: usize,
    k: usize,
    accumulate: bool,
    pf: Prefetch,
) {
    let l = S::LANES;
    let ldc = c.ld;
    for j in (j0..j1).step_by(NV * l) {
        // B streamed from memory (decoding's values) is requested on the first strip only.
        let prefetch = j == 0 && !pf.first.is_null();
        let mut acc = [[S::zero(); NV]; R];
        // SAFETY: indices stay inside the extents the caller vouched for.
        unsafe {
            if accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, x) in row.iter_mut().enumerate() {
                        *x = S::load(c.p.add(r * ldc + j + v * l));
                    }
                }
            }
            let mut ap = a.p;
            let mut bp = b.p.add(j);
            for kk in 0..k {
                if prefetch {
                    pf.ahead(kk, 1);
                }
                // Plain loops, not `array::from_fn`: its closure is not always inlined into the
                // target-feature function, and an intrinsic called out of line is a slow call.
                let mut bv = [S::zero(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = E::load::<S>(bp.add(v * l));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = S::splat(*ap.offset(r as isize * a.rs));
                    for (x, &bx) in row.iter_mut().zip(&bv) {
                        *x = S::fma(av, bx, *x);
                    }
                }
                ap = ap.offset(a.ks);
                bp = bp.offset(b.ld);
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    S::store(c.p.add(r * ldc + j + v * l), *x);
                }
            }
        }
    }
}

/// `C[m×n] (+)= A[m×k] · B[k×n]`, B of element type `E` (widened in registers).
///
/// # Safety
/// `n` must be a multiple of `S::LANES`; A, B and C must be valid for those extents, and C
/// must not overlap A or B.
#[inline(always)]
pub(crate) unsafe fn gemm<S: Simd, E: Elem>(a: A, b: B<E>, c: C, m: usize, n: usize, k: usize, accumulate: bool) {
    debug_assert!(n.is_multiple_of(S::LANES));
    let mut i = 0;
    // SAFETY: each call covers rows i..i + R of A and C, inside m.
    unsafe {
        while i + MR <= m {
            let (ai, ci) = (a.at_row(i), c.at_row(i));
            if S::REGISTERS >= 32 {
                // 32 registers (AVX-512, NEON) hold 6 × 4 accumulators: each broadcast feeds 4
                // FMAs instead of 2 (prefill 8–15% faster on the Xeon; `docs/performance.md`,
                // "Micro-tiles 6x4 on AVX-512").
                block::<S, E, MR, 4>(ai, b, ci, n, k, accumulate, Prefetch::NONE);
            } else {
                block::<S, E, MR, 2>(ai, b, ci, n, k, accumulate, Prefetch::NONE);
            }
            i += MR;
        }
        few_rows::<S, E>(a.at_row(i), b, c.at_row(i), m - i, n, k, accumulate, Prefetch::NONE, false);
    }
}

/// `C[m×n] += A[m×k] · B[k×n]` for `m ≤ 4` rows against a B that is streamed from memory once
/// (decoding's values): on AVX-512, every row of B is read whole, in order, in one pass, and
/// requested ahead through `pf` (see [`Prefetch::ahead`]); elsewhere as [`gemm`], with the
/// requests on its first strip.
///
/// Reading B in two strips of half rows (as [`gemm`] does for 3 and 4 rows, to keep its
/// accumulators in registers) costs a second pass over the tile and breaks the order the
/// requests run in; one pass, with 4 × 8 accumulators that no longer all fit in registers
/// next to B's row, measured faster for 4-row GQA groups (`docs/performance.md`, "P·V in one
/// pass for GQA groups").
///
/// # Safety
/// As for [`gemm`], with `m ≤ 4`.
#[inline(always)]
pub(crate) unsafe fn stream_rows<S: Simd, E: Elem>(a: A, b: B<E>, c: C, m: usize, n: usize, k: usize, pf: Prefetch) {
    debug_assert!(m <= 4);
    // SAFETY: forwarded.
    unsafe { few_rows::<S, E>(a, b, c, m, n, k, true, pf, true) }
}

/// The last `m < MR` rows of [`gemm`], or the rows of [`stream_rows`] (`one_pass`: B's rows
/// read whole on AVX-512 even where the accumulators do not all fit in registers).
///
/// # Safety
/// As for [`gemm`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows<S: Simd, E: Elem>(
    a: A,
    b: B<E>,
    c: C,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    pf: Prefetch,
    one_pass: bool,
) {
    // SAFETY: each call covers the m rows the caller vouched for.
    unsafe {
        // Fewer rows leave registers for wider strips: fewer passes over B, which matters when
        // B (a V tile while decoding) is streamed rather than reused. R·NV accumulators plus NV
        // B vectors plus a broadcast stay within AVX2's 16 registers with room for widening a
        // narrow B; one more and an accumulator spills, putting a store and a reload on its
        // dependency chain (measured: int8 decode 2× slower with 4 rows × 3 vectors).
        if S::LANES >= 16 {
            // AVX-512's 32 registers: strips of up to 8 vectors (a 128-wide head at once), so
            // each probability is broadcast once per key for the whole row.
            match m {
                1 => block::<S, E, 1, 8>(a, b, c, n, k, accumulate, pf),
                2 => block::<S, E, 2, 8>(a, b, c, n, k, accumulate, pf),
                3 if one_pass => block::<S, E, 3, 8>(a, b, c, n, k, accumulate, pf),
                4 if one_pass => block::<S, E, 4, 8>(a, b, c, n, k, accumulate, pf),
                3 => block::<S, E, 3, 6>(a, b, c, n, k, accumulate, pf),
                4 => block::<S, E, 4, 4>(a, b, c, n, k, accumulate, pf),
                5 => block::<S, E, 5, 4>(a, b, c, n, k, accumulate, pf),
                _ => {}
            }
            return;
        }
        match m {
            1 => block::<S, E, 1, 6>(a, b, c, n, k, accumulate, pf),
            2 => block::<S, E, 2, 4>(a, b, c, n, k, accumulate, pf),
            3 => block::<S, E, 3, 3>(a, b, c, n, k, accumulate, pf),
            4 => block::<S, E, 4, 2>(a, b, c, n, k, accumulate, pf),
            5 => block::<S, E, 5, 2>(a, b, c, n, k, accumulate, pf),
            _ => {}
        }
    }
}
