//! Constants of the vector `exp2` every SIMD path shares.
//!
//! 2^x = 2^n · 2^r with n = round(x), r = x − n in [−½, ½], 2^r by the Taylor polynomial of
//! e^(r·ln2) to degree 6 (error ≈ 1.2e-7, about 1 ulp). Scores are kept in base-2 units (log2 e is
//! folded into the query scale), which saves the multiply and the two-part ln2 reduction of exp.

pub(crate) const EXP2_HI: f32 = 127.0;
pub(crate) const EXP2_LO: f32 = -127.0;
pub(crate) const EXP2_ZERO_BELOW: f32 = -126.0;
pub(crate) const LN2: f32 = std::f32::consts::LN_2;
pub(crate) const C1: f32 = LN2;
pub(crate) const C2: f32 = LN2 * LN2 / 2.0;
pub(crate) const C3: f32 = C2 * LN2 / 3.0;
pub(crate) const C4: f32 = C3 * LN2 / 4.0;
pub(crate) const C5: f32 = C4 * LN2 / 5.0;
pub(crate) const C6: f32 = C5 * LN2 / 6.0;
