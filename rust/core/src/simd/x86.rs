//! AVX2+FMA (8 lanes) and AVX-512F (16 lanes) implementations of [`Simd`].
//!
//! The methods are `#[inline(always)]` and only reach the CPU inside the `#[target_feature]`
//! entry points of the kernels, which are called only after [`super::Isa::available`] found the
//! features; that is what makes the `unsafe` intrinsic calls below sound.

use super::Simd;
use std::arch::x86_64::*;

// exp(x) = 2^n · e^r with n = round(x·log2 e), r = x − n·ln 2 split in two parts for accuracy,
// e^r by its Taylor polynomial to degree 6 (|r| ≤ ln2/2 keeps the error near 1 ulp).
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -88.0;
const EXP_ZERO_BELOW: f32 = -87.3;
const C2: f32 = 1.0 / 2.0;
const C3: f32 = 1.0 / 6.0;
const C4: f32 = 1.0 / 24.0;
const C5: f32 = 1.0 / 120.0;
const C6: f32 = 1.0 / 720.0;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: only instantiated inside `#[target_feature(enable = "avx2,fma")]` functions that are
// called after run-time detection of avx2 and fma.
unsafe impl Simd for Avx2 {
    const LANES: usize = 8;
    type V = __m256;

    #[inline(always)]
    fn zero() -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn splat(x: f32) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees 8 readable floats; the ISA as for the impl.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m256) {
        // SAFETY: the caller guarantees 8 writable floats; the ISA as for the impl.
        unsafe { _mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(a: __m256, b: __m256) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn max(a: __m256, b: __m256) -> __m256 {
        // maxps returns its second operand when either is NaN: NaN in `b` is kept.
        // SAFETY: see the impl's safety note.
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn exp(x: __m256) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe {
            // min/max with the constant first keep a NaN `x` (second operand wins on NaN).
            let xc = _mm256_max_ps(
                _mm256_set1_ps(EXP_LO),
                _mm256_min_ps(_mm256_set1_ps(EXP_HI), x),
            );
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(xc, _mm256_set1_ps(LOG2E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(C6);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C5));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            let y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
            let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP_ZERO_BELOW));
            _mm256_andnot_ps(tiny, y)
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: only instantiated inside `#[target_feature(enable = "avx512f")]` functions that are
// called after run-time detection of avx512f.
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    type V = __m512;

    #[inline(always)]
    fn zero() -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(x: f32) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees 16 readable floats; the ISA as for the impl.
        unsafe { _mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: __m512) {
        // SAFETY: the caller guarantees 16 writable floats; the ISA as for the impl.
        unsafe { _mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn max(a: __m512, b: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn exp(x: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe {
            let xc = _mm512_max_ps(
                _mm512_set1_ps(EXP_LO),
                _mm512_min_ps(_mm512_set1_ps(EXP_HI), x),
            );
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm512_mul_ps(xc, _mm512_set1_ps(LOG2E)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(C6);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C5));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C4));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
            let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            ));
            let y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP_ZERO_BELOW));
            _mm512_maskz_mov_ps(keep, y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp8(x: &[f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: the arrays hold 8 floats; the caller checked the features.
        unsafe { Avx2::store(out.as_mut_ptr(), Avx2::exp(Avx2::load(x.as_ptr()))) };
        out
    }

    #[test]
    fn avx2_exp_is_accurate_and_safe_at_the_edges() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut worst = 0f64;
        for i in 0..20_000 {
            let x0 = -87.0 + i as f32 * 0.00437;
            let xs: [f32; 8] = std::array::from_fn(|t| x0 + t as f32 * 0.0005);
            // SAFETY: features checked above.
            let ys = unsafe { exp8(&xs) };
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64).exp();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let edge = [
            f32::NEG_INFINITY,
            -1e30,
            -88.0,
            -87.5,
            0.0,
            f32::NAN,
            -0.0,
            1e-30,
        ];
        // SAFETY: features checked above.
        let ys = unsafe { exp8(&edge) };
        assert_eq!(&ys[..4], &[0.0; 4]);
        assert_eq!(ys[4], 1.0);
        assert!(ys[5].is_nan());
        assert_eq!(ys[6], 1.0);
        assert_eq!(ys[7], 1.0);
    }
}
