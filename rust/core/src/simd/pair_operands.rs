//! The operands of bf16 pair products, as every pair unit takes them (see `pairs`): rows to
//! pack, which side of the product they are, and packed pair rows.

/// Rows of f32 or bf16 (as bits) elements, `ld` elements apart.
#[derive(Clone, Copy)]
pub(crate) enum Rows {
    F32(*const f32, isize),
    BF16(*const u16, isize),
}

/// Which operand of a product a packed matrix is: its segments are (hi, hi, lo) for the first
/// and (hi, lo, hi) for the second, so the three segment products are hi·hi, hi·lo, lo·hi.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    First,
    Second,
}

impl Side {
    /// Whether segment `t` of this side holds the low parts.
    #[inline(always)]
    pub(crate) fn low(self, t: usize) -> bool {
        matches!((self, t), (Side::First, 2) | (Side::Second, 1))
    }
}

/// The left operand of `pairs::PairUnit::gemm`: the pair word `(i, p)` at `p + i·rs + p·ks`.
#[derive(Clone, Copy)]
pub(crate) struct Pairs {
    pub p: *const u32,
    pub rs: isize,
    pub ks: isize,
}
