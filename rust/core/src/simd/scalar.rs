//! The portable path: one lane, plain arithmetic. It is the reference the vector paths are
//! tested against and the path every CPU can run.

use super::Simd;

#[derive(Clone, Copy)]
pub(crate) struct Scalar;

// SAFETY: uses no instruction beyond the baseline target.
unsafe impl Simd for Scalar {
    const LANES: usize = 1;
    type V = f32;
    #[inline(always)]
    fn zero() -> f32 {
        0.0
    }
    #[inline(always)]
    fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        unsafe { *p }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        // SAFETY: the caller guarantees `p` is writable.
        unsafe { *p = v }
    }
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        // Not `mul_add`: without hardware FMA that is a slow libm call.
        a * b + c
    }
    #[inline(always)]
    fn add(a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn max(a: f32, b: f32) -> f32 {
        // NaN in `b` wins, as in the vector paths, so a NaN score is not dropped.
        if a > b {
            a
        } else {
            b
        }
    }
    #[inline(always)]
    fn exp2(x: f32) -> f32 {
        if x < -126.0 {
            0.0
        } else {
            x.exp2()
        }
    }
    #[inline(always)]
    fn reduce_sum(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn reduce_max(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    unsafe fn store_sums4(a: f32, b: f32, c: f32, d: f32, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable floats.
        unsafe { p.cast::<[f32; 4]>().write_unaligned([a, b, c, d]) }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        half::f16::from_bits(unsafe { *p }).to_f32()
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        half::bf16::from_bits(unsafe { *p }).to_f32()
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> f32 {
        // SAFETY: the caller guarantees `p` is readable.
        unsafe { *p as f32 }
    }
}
