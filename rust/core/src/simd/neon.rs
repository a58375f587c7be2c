//! AArch64 Advanced SIMD (NEON, 4 lanes) implementation of [`Simd`].
//!
//! NEON is part of the AArch64 baseline, so one build serves every 64-bit ARM core, from a
//! Cortex-A53 to a Neoverse V2; what differs between them (`dotprod`, `bf16`, `i8mm`) is
//! checked at run time where a kernel uses it. The widening loads use baseline instructions
//! only: `fcvtl` for IEEE halves (the FP16 extension adds half-precision *arithmetic*, not the
//! conversion), a 16-bit left shift for bfloat16, and sign extensions for int8.
//!
//! The 32 vector registers hold the same micro-tiles as AVX-512 (see `gemm`), a quarter as
//! wide: the broadcasts of the micro-kernel's A elements become `fmla` by element, whose scalar
//! operand is read straight from a register lane.

use super::exp2::{C1, C2, C3, C4, C5, C6, EXP2_HI, EXP2_LO, EXP2_ZERO_BELOW};
use super::Simd;
use std::arch::aarch64::*;

#[derive(Clone, Copy)]
pub(crate) struct Neon;

// SAFETY: only instantiated inside `#[target_feature(enable = "neon")]` functions that are called
// after run-time detection of neon (part of every AArch64 Linux, macOS and Windows target).
unsafe impl Simd for Neon {
    const LANES: usize = 4;
    const REGISTERS: usize = 32;
    type V = float32x4_t;

    #[inline(always)]
    fn zero() -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe { vdupq_n_f32(0.0) }
    }
    #[inline(always)]
    fn splat(x: f32) -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable floats; the ISA as for the impl.
        unsafe { vld1q_f32(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: float32x4_t) {
        // SAFETY: the caller guarantees 4 writable floats; the ISA as for the impl.
        unsafe { vst1q_f32(p, v) }
    }
    #[inline(always)]
    fn fma(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    fn add(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    fn sub(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    fn max(a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // `a > b ? a : b`, as x86's maxps and the scalar path: a NaN in `b` is kept, one in `a`
        // is not (`fmax` would keep both, `fmaxnm` neither), so every path agrees.
        // SAFETY: see the impl's safety note.
        unsafe { vbslq_f32(vcgtq_f32(a, b), a, b) }
    }
    #[inline(always)]
    fn exp2(x: float32x4_t) -> float32x4_t {
        // SAFETY: see the impl's safety note.
        unsafe {
            // fmin/fmax return NaN when either operand is NaN: a NaN `x` is kept.
            let xc = vmaxq_f32(vdupq_n_f32(EXP2_LO), vminq_f32(vdupq_n_f32(EXP2_HI), x));
            let n = vrndnq_f32(xc);
            let r = vsubq_f32(xc, n);
            let mut p = vdupq_n_f32(C6);
            p = vfmaq_f32(vdupq_n_f32(C5), p, r);
            p = vfmaq_f32(vdupq_n_f32(C4), p, r);
            p = vfmaq_f32(vdupq_n_f32(C3), p, r);
            p = vfmaq_f32(vdupq_n_f32(C2), p, r);
            p = vfmaq_f32(vdupq_n_f32(C1), p, r);
            p = vfmaq_f32(vdupq_n_f32(1.0), p, r);
            let bits = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
            let y = vmulq_f32(p, vreinterpretq_f32_s32(bits));
            let tiny = vcltq_f32(x, vdupq_n_f32(EXP2_ZERO_BELOW));
            vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(y), tiny))
        }
    }
    #[inline(always)]
    fn reduce_sum(v: float32x4_t) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    fn reduce_max(v: float32x4_t) -> f32 {
        // SAFETY: see the impl's safety note.
        unsafe { vmaxvq_f32(v) }
    }
    #[inline(always)]
    unsafe fn store_sums4(a: float32x4_t, b: float32x4_t, c: float32x4_t, d: float32x4_t, p: *mut f32) {
        // SAFETY: the caller guarantees 4 writable floats; the ISA as for the impl.
        unsafe {
            // Pairwise adds: [a0+a1, a2+a3, b0+b1, b2+b3], the same of c and d, then [a, b, c, d].
            let ab = vpaddq_f32(a, b);
            let cd = vpaddq_f32(c, d);
            vst1q_f32(p, vpaddq_f32(ab, cd))
        }
    }
    #[inline(always)]
    unsafe fn load_f16(p: *const u16) -> float32x4_t {
        // SAFETY: the caller guarantees 4 readable values; `fcvtl` is baseline AArch64 (its
        // intrinsic needs the unstable f16 types, hence the one instruction written out).
        unsafe {
            let h = vld1_u16(p);
            let f: float32x4_t;
            std::arch::asm!(
                "fcvtl {f:v}.4s, {h:v}.4h",
                h = in(vreg) h,
                f = lateout(vreg) f,
                options(pure, nomem, nostack, preserves_flags)
            );
            f
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> float32x4_t {
        // SAFETY: as for load_f16.
        unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p))) }
    }
    #[inline(always)]
    unsafe fn load_i8(p: *const i8) -> float32x4_t {
        // SAFETY: as for load_f16; exactly 4 bytes are read.
        unsafe {
            let w = (p as *const u32).read_unaligned();
            let b = vreinterpret_s8_u32(vdup_n_u32(w));
            vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp2_4(x: &[f32; 4]) -> [f32; 4] {
        let mut out = [0f32; 4];
        // SAFETY: the arrays hold 4 floats; NEON is baseline on AArch64.
        unsafe { Neon::store(out.as_mut_ptr(), Neon::exp2(Neon::load(x.as_ptr()))) };
        out
    }

    #[test]
    fn exp2_is_accurate_and_safe_at_the_edges() {
        let mut worst = 0f64;
        for i in 0..40_000 {
            let x0 = -125.0 + i as f32 * 0.00627;
            let xs: [f32; 4] = std::array::from_fn(|t| x0 + t as f32 * 0.0005);
            for (&x, &y) in xs.iter().zip(&exp2_4(&xs)) {
                let want = (x as f64).exp2();
                worst = worst.max(((y as f64 - want) / want).abs());
            }
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp2_4(&[f32::NEG_INFINITY, -1e30, -127.0, -126.5]), [0.0; 4]);
        let ys = exp2_4(&[0.0, f32::NAN, -0.0, 1e-30]);
        assert_eq!([ys[0], ys[2], ys[3]], [1.0; 3]);
        assert!(ys[1].is_nan());
    }

    #[test]
    fn max_keeps_a_nan_in_its_second_operand_like_the_other_paths() {
        let (a, b) = ([1.0, f32::NAN, 3.0, -0.0], [2.0, 5.0, f32::NAN, 0.0]);
        let mut out = [0f32; 4];
        // SAFETY: the arrays hold 4 floats.
        unsafe { Neon::store(out.as_mut_ptr(), Neon::max(Neon::load(a.as_ptr()), Neon::load(b.as_ptr()))) };
        for t in 0..4 {
            let want = super::super::scalar::Scalar::max(a[t], b[t]);
            assert_eq!(out[t].to_bits(), want.to_bits(), "lane {t}");
        }
    }

    #[test]
    fn four_lane_sums_and_max_match_plain_loops() {
        let x: [f32; 16] = std::array::from_fn(|i| ((i * 37 % 23) as f32 - 11.0) * 0.25 + i as f32 * 1e-3);
        let mut sums = [0f32; 4];
        // SAFETY: the array holds 4 × 4 floats.
        let mx = unsafe {
            let v = |i: usize| Neon::load(x.as_ptr().add(4 * i));
            Neon::store_sums4(v(0), v(1), v(2), v(3), sums.as_mut_ptr());
            Neon::reduce_max(v(1))
        };
        for (t, &got) in sums.iter().enumerate() {
            let want: f32 = x[4 * t..4 * t + 4].iter().sum();
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "vector {t}: {got} vs {want}");
        }
        assert_eq!(mx, x[4..8].iter().fold(f32::NEG_INFINITY, |m, &y| m.max(y)));
        // SAFETY: as above.
        let sum = Neon::reduce_sum(unsafe { Neon::load(x.as_ptr()) });
        let want: f32 = x[..4].iter().sum();
        assert!((sum - want).abs() <= 1e-6 * (1.0 + want.abs()), "{sum} vs {want}");
    }

    #[test]
    fn widening_loads_are_exact() {
        use half::{bf16, f16};
        let vals = [0.0f32, -1.5, 65504.0, 6.1e-5, -3.0e-7, f32::INFINITY, 1.0e-3, -2.5];
        let h: Vec<u16> = vals.iter().map(|&x| f16::from_f32(x).to_bits()).collect();
        let b: Vec<u16> = vals.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let i: Vec<i8> = vec![-128, -1, 0, 1, 127, 42, -77, 5];
        for c in [0, 4] {
            let mut out = [[0f32; 4]; 3];
            // SAFETY: each source holds 8 elements, 4 are read from `c`.
            unsafe {
                Neon::store(out[0].as_mut_ptr(), Neon::load_f16(h.as_ptr().add(c)));
                Neon::store(out[1].as_mut_ptr(), Neon::load_bf16(b.as_ptr().add(c)));
                Neon::store(out[2].as_mut_ptr(), Neon::load_i8(i.as_ptr().add(c)));
            }
            for t in 0..4 {
                assert_eq!(out[0][t].to_bits(), f16::from_bits(h[c + t]).to_f32().to_bits());
                assert_eq!(out[1][t].to_bits(), bf16::from_bits(b[c + t]).to_f32().to_bits());
                assert_eq!(out[2][t], i[c + t] as f32);
            }
        }
        // A NaN half stays a NaN.
        let nan = [f16::NAN.to_bits(); 4];
        // SAFETY: 4 values.
        assert!(Neon::reduce_sum(unsafe { Neon::load_f16(nan.as_ptr()) }).is_nan());
    }
}
