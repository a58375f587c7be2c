//! AVX2+FMA (8 lanes) and AVX-512F (16 lanes) implementations of [`Simd`].
//!
//! The methods are `#[inline(always)]` and only reach the CPU inside the `#[target_feature]`
//! entry points of the kernels, which are called only after [`super::Isa::available`] found the
//! features; that is what makes the `unsafe` intrinsic calls below sound.

use super::exp2::{C1, C2, C3, C4, C5, C6, EXP2_HI, EXP2_LO, EXP2_ZERO_BELOW};
use super::Simd;
use std::arch::x86_64::*;

#[derive(Clone, Copy)]
pub(crate) struct Avx2;

// SAFETY: only instantiated inside `#[target_feature(enable = "avx2,fma,f16c")]` functions that
// are called after run-time detection of avx2, fma and f16c.
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
    fn exp2(x: __m256) -> __m256 {
        // SAFETY: see the impl's safety note.
        unsafe {
            // min/max with the constant first keep a NaN `x` (second operand wins on NaN).
            let xc = _mm256_max_ps(_mm256_set1_ps(EXP2_LO), _mm256_min_ps(_mm256_set1_ps(EXP2_HI), x));
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
            let r = _mm256_sub_ps(xc, n);
            let mut p = _mm256_set1_ps(C6);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C5));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C1));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
            let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
            let y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
            let tiny = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(EXP2_ZERO_BELOW));
            _mm256_andnot_ps(tiny, y)
        }
    }
    #[inline(always)]
    fn reduce_sum(v: __m256) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    fn reduce_max(v: __m256) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_max_ss(s, _mm_shuffle_ps::<0b01>(s, s));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn store_sums4(a: __m256, b: __m256, c: __m256, d: __m256, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable floats; the ISA as for the impl.
        unsafe {
            // Per 128-bit half: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partial sums.
            let ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            let cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
            let (ab, cd) = (_mm256_castps_pd(ab), _mm256_castps_pd(cd));
            let abcd = _mm256_add_ps(
                _mm256_castpd_ps(_mm256_unpacklo_pd(ab, cd)),
                _mm256_castpd_ps(_mm256_unpackhi_pd(ab, cd)),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps::<1>(abcd));
            _mm_storeu_ps(p, s)
        }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees LANES readable values; the ISA as for the impl.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m256 {
        // SAFETY: as for load_f16.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
        }
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> __m256 {
        // SAFETY: as for load_f16.
        unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Avx512;

// SAFETY: only instantiated inside `#[target_feature(enable = "avx512f")]` functions that are
// called after run-time detection of avx512f.
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    const REGISTERS: usize = 32;
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
    fn exp2(x: __m512) -> __m512 {
        // SAFETY: see the impl's safety note.
        unsafe {
            // min/max with the constant first keep a NaN `x` (second operand wins on NaN).
            let xc = _mm512_max_ps(_mm512_set1_ps(EXP2_LO), _mm512_min_ps(_mm512_set1_ps(EXP2_HI), x));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
            let r = _mm512_sub_ps(xc, n);
            let mut p = _mm512_set1_ps(C6);
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C5));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C4));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C3));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C2));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(C1));
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
            let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
            let y = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(EXP2_ZERO_BELOW));
            _mm512_maskz_mov_ps(keep, y)
        }
    }
    #[inline(always)]
    fn reduce_sum(v: __m512) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    fn reduce_max(v: __m512) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe { _mm512_reduce_max_ps(v) }
    }
    #[inline(always)]
    unsafe fn store_sums4(a: __m512, b: __m512, c: __m512, d: __m512, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable floats; the ISA as for the impl.
        unsafe {
            // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partial sums;
            // then the four lanes are added.
            let ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
            let cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
            let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
            let abcd = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
            );
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd)));
            let h = _mm256_add_ps(_mm512_castps512_ps256(abcd), hi);
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            _mm_storeu_ps(p, s)
        }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> __m512 {
        // SAFETY: the caller guarantees LANES readable values; the ISA as for the impl.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        // SAFETY: as for load_f16.
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))))
        }
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> __m512 {
        // SAFETY: as for load_f16.
        unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp2_8(x: &[f32; 8]) -> [f32; 8] {
        let mut out = [0f32; 8];
        // SAFETY: the arrays hold 8 floats; the caller checked the features.
        unsafe { Avx2::store(out.as_mut_ptr(), Avx2::exp2(Avx2::load(x.as_ptr()))) };
        out
    }

    #[test]
    fn avx2_exp2_is_accurate_and_safe_at_the_edges() {
        if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
            return;
        }
        let mut worst = 0f64;
        for i in 0..20_000 {
            let x0 = -125.0 + i as f32 * 0.00627;
            let xs: [f32; 8] = std::array::from_fn(|t| x0 + t as f32 * 0.0005);
            // SAFETY: features checked above.
            let ys = unsafe { exp2_8(&xs) };
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64).exp2();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        let edge = [f32::NEG_INFINITY, -1e30, -127.0, -126.5, 0.0, f32::NAN, -0.0, 1e-30];
        // SAFETY: features checked above.
        let ys = unsafe { exp2_8(&edge) };
        assert_eq!(&ys[..4], &[0.0; 4]);
        assert_eq!(ys[4], 1.0);
        assert!(ys[5].is_nan());
        assert_eq!(ys[6], 1.0);
        assert_eq!(ys[7], 1.0);
    }

    /// Four vectors of 16 (AVX-512) or 8 (AVX2) lanes, their lane sums by the shuffle tree,
    /// and their max.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn sums4_512(x: &[f32; 64]) -> ([f32; 4], f32) {
        let mut out = [0f32; 4];
        // SAFETY: the array holds 4 × 16 floats; the caller checked the features.
        unsafe {
            let v = |i: usize| Avx512::load(x.as_ptr().add(16 * i));
            Avx512::store_sums4(v(0), v(1), v(2), v(3), out.as_mut_ptr());
            (out, Avx512::reduce_max(v(1)))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sums4_256(x: &[f32; 64]) -> ([f32; 4], f32) {
        let mut out = [0f32; 4];
        // SAFETY: the array holds 4 × 8 floats at the front; the caller checked the features.
        unsafe {
            let v = |i: usize| Avx2::load(x.as_ptr().add(8 * i));
            Avx2::store_sums4(v(0), v(1), v(2), v(3), out.as_mut_ptr());
            (out, Avx2::reduce_max(v(1)))
        }
    }

    #[test]
    fn four_lane_sums_and_max_match_plain_loops() {
        let x: [f32; 64] = std::array::from_fn(|i| ((i * 37 % 23) as f32 - 11.0) * 0.25 + i as f32 * 1e-3);
        let check = |lanes: usize, (sums, mx): ([f32; 4], f32)| {
            for (t, &got) in sums.iter().enumerate() {
                let want: f32 = x[t * lanes..(t + 1) * lanes].iter().sum();
                assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "lanes {lanes} vector {t}: {got} vs {want}");
            }
            let want = x[lanes..2 * lanes].iter().fold(f32::NEG_INFINITY, |m, &y| m.max(y));
            assert_eq!(mx, want, "lanes {lanes}");
        };
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: features checked.
            check(8, unsafe { sums4_256(&x) });
        }
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: features checked.
            check(16, unsafe { sums4_512(&x) });
        }
    }
}
