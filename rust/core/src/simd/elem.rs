//! Element types the kernels read directly, widened to f32 in registers.

use super::Simd;
use half::{bf16, f16};

/// A storage type of keys/values.
///
/// # Safety
/// `load` must read exactly `S::LANES` elements from `p`.
pub(crate) unsafe trait Elem: Copy {
    /// # Safety
    /// `p` must be valid for reading `S::LANES` elements.
    unsafe fn load<S: Simd>(p: *const Self) -> S::V;
    fn to_f32(self) -> f32;
}

// SAFETY: each impl forwards to the matching widening load of `LANES` elements.
unsafe impl Elem for f32 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f32) -> S::V {
        // SAFETY: forwarded.
        unsafe { S::load(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

// SAFETY: as above.
unsafe impl Elem for f16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const f16) -> S::V {
        // SAFETY: forwarded; f16 is a transparent u16.
        unsafe { S::load_f16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

// SAFETY: as above.
unsafe impl Elem for bf16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const bf16) -> S::V {
        // SAFETY: forwarded; bf16 is a transparent u16.
        unsafe { S::load_bf16(p as *const u16) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

// SAFETY: as above.
unsafe impl Elem for i8 {
    #[inline(always)]
    unsafe fn load<S: Simd>(p: *const i8) -> S::V {
        // SAFETY: forwarded.
        unsafe { S::load_i8(p) }
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}
