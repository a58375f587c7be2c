//! The units that multiply bf16 pairs, and the one this call uses: the table for products
//! over pairs, as `dispatch` is for the f32 kernels.
//!
//! The operands' layout is the one matrix units read too: the left operand rows of pairs
//! along the shared dimension, the right one pairs of its rows interleaved (AMX's `tdpbf16ps`
//! takes B tiles in this form), so the packing in `bf16dot` serves any unit. An AMX tile
//! product is a `simd/amx.rs` with its own `gemm`, a `PairUnit::Amx` found by
//! [`PairUnit::active`], and one arm in [`PairUnit::gemm`]; the attention step does not change.

#[cfg(target_arch = "x86_64")]
use super::bf16dot;
pub(crate) use super::pair_operands::{Pairs, Rows, Side};
use super::Isa;

/// A unit that multiplies packed bf16 pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairUnit {
    /// `vdpbf16ps` on the AVX-512 path.
    Avx512Bf16,
}

impl PairUnit {
    /// The unit for kernels running on `isa`, if the CPU has one (and `FERROATTN_BF16DOT=0`
    /// does not turn it off).
    pub(crate) fn active(isa: Isa) -> Option<PairUnit> {
        #[cfg(target_arch = "x86_64")]
        if isa == Isa::Avx512 && bf16dot::available() {
            return Some(PairUnit::Avx512Bf16);
        }
        let _ = isa;
        None
    }

    /// `C[m×n] = scale · A[m×k2]·B[k2×n]` (or `C += A·B` with `accumulate`, `scale` then
    /// unused) over `k2` pair words; B's rows (pairs of rows interleaved, see
    /// [`PairUnit::pack_row_pairs`]) are `ldb` words apart, C's rows `ldc` floats apart.
    ///
    /// # Safety
    /// `self` came from [`PairUnit::active`]; `n` is a multiple of 16; every addressed element
    /// is valid and C overlaps neither A nor B.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    // Elsewhere than x86-64 no unit is ever found, so its arguments go unread.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(crate) unsafe fn gemm(
        self,
        a: Pairs,
        b: *const u32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        m: usize,
        n: usize,
        k2: usize,
        scale: f32,
        accumulate: bool,
    ) {
        match self {
            // SAFETY: forwarded; the unit was found available.
            #[cfg(target_arch = "x86_64")]
            PairUnit::Avx512Bf16 => unsafe { bf16dot::gemm(a, b, ldb, c, ldc, m, n, k2, scale, accumulate) },
            #[cfg(not(target_arch = "x86_64"))]
            PairUnit::Avx512Bf16 => unreachable!("found only on x86-64"),
        }
    }

    /// Packs `n` rows of `d` elements into bf16 rows `ld` apart at `dst`, pairs along the row
    /// (a left operand): segment `t < terms` of row `j` starts at `j·ld + t·dp` (`dp = d`
    /// rounded up to even), with a zero at `d` when `d` is odd.
    ///
    /// # Safety
    /// `self` came from [`PairUnit::active`]; `src` holds `n` rows of `d` readable elements;
    /// `dst` holds `n` rows of `ld ≥ terms·dp` elements.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    // Elsewhere than x86-64 no unit is ever found, so its arguments go unread.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(crate) unsafe fn pack_rows(
        self,
        src: Rows,
        n: usize,
        d: usize,
        terms: usize,
        side: Side,
        dst: *mut u16,
        ld: usize,
    ) {
        match self {
            // SAFETY: forwarded.
            #[cfg(target_arch = "x86_64")]
            PairUnit::Avx512Bf16 => unsafe { bf16dot::pack_rows(src, n, d, terms, side, dst, ld) },
            #[cfg(not(target_arch = "x86_64"))]
            PairUnit::Avx512Bf16 => unreachable!("found only on x86-64"),
        }
    }

    /// Packs `n` rows of `w` elements into pairs of consecutive rows, interleaved (a right
    /// operand, or a left one stored transposed): the word at `(t·np/2 + j/2)·ld + c` holds
    /// rows `j` and `j + 1` of column `c` in segment `t < terms` (`np = n` rounded up to even,
    /// the missing row of an odd `n` zero); columns `w..wp` are zero.
    ///
    /// # Safety
    /// `self` came from [`PairUnit::active`]; `src` holds `n` rows of `w` readable elements;
    /// `dst` holds `terms·np/2` rows of `ld ≥ wp` words; `wp ≥ w` is a multiple of 16.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    // Elsewhere than x86-64 no unit is ever found, so its arguments go unread.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub(crate) unsafe fn pack_row_pairs(
        self,
        src: Rows,
        n: usize,
        w: usize,
        wp: usize,
        terms: usize,
        side: Side,
        dst: *mut u32,
        ld: usize,
    ) {
        match self {
            // SAFETY: forwarded.
            #[cfg(target_arch = "x86_64")]
            PairUnit::Avx512Bf16 => unsafe { bf16dot::pack_row_pairs(src, n, w, wp, terms, side, dst, ld) },
            #[cfg(not(target_arch = "x86_64"))]
            PairUnit::Avx512Bf16 => unreachable!("found only on x86-64"),
        }
    }
}

/// Transposes the pair words of `rows` rows (`w2` words each, `lds` apart) into `w2` rows of
/// `rows` words `ldd` apart: a packed query tile (rows of pairs along D) becomes the right
/// operand of the score product.
///
/// # Safety
/// The extents are valid and do not overlap.
pub(crate) unsafe fn transpose_words(src: *const u32, rows: usize, w2: usize, lds: usize, dst: *mut u32, ldd: usize) {
    // SAFETY: forwarded.
    unsafe {
        for r in 0..rows {
            for p in 0..w2 {
                *dst.add(p * ldd + r) = src.add(r * lds + p).read_unaligned();
            }
        }
    }
}

/// Whether prefill tiles of bf16 inputs (and of f32 inputs at a lower `Precision`) run on
/// bf16 pair products on this CPU: the AVX-512 path with AVX-512 BF16, unless
/// `FERROATTN_BF16DOT=0`. (No AMX unit is used yet.)
pub fn bf16_dot() -> bool {
    PairUnit::active(Isa::active()).is_some()
}
