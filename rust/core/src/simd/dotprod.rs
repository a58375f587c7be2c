//! int8 keys against queries held as two signed bytes, with the `sdot` integer dot product
//! (Armv8.2 `dotprod`: Cortex-A55/A76 and later, Neoverse, Apple silicon): the aarch64
//! counterpart of the VNNI score path (`vnni.rs`), which the decode path calls on the NEON path
//! where [`available`] holds.
//!
//! Widening int8 keys to f32 costs three instructions per 4 elements before the multiply;
//! `sdot` multiplies 16 pairs of bytes and accumulates into four 32-bit lanes in one. To keep
//! the queries as precise as VNNI's 16-bit ones, each query row is rounded to an integer
//! `q = 256·hi + lo` (`|q| ≤ 127·256`, one scale per row: a relative error of ~1.5e-5 per
//! element), and its high and low bytes go through two `sdot`s against the same key bytes.
//! The intrinsic is not stable before Rust 1.98, so the one instruction is written out.

use std::arch::aarch64::*;
use std::sync::OnceLock;

/// Widest head [`scores`] takes: each 32-bit lane sums `d / 4` products of at most 128 · 127.
pub(crate) const MAX_D: usize = 4096;

/// Largest magnitude of a rounded query element: `hi` stays within a signed byte.
const Q_MAX: f32 = 127.0 * 256.0;

/// Whether this CPU has `sdot` (and `FERROATTN_DOTPROD=0` does not turn it off: the tests run
/// the float int8 path on the same CPU that way too).
pub(crate) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("FERROATTN_DOTPROD").map_or(true, |v| v.trim() != "0")
            && std::arch::is_aarch64_feature_detected!("dotprod")
    })
}

/// Rounds `rows` query rows of `d` floats (`d` a multiple of 16) for [`scores`]: row `r`'s high
/// bytes go to `planes[2r·d..]`, its low bytes to `planes[(2r + 1)·d..]`, its scale to
/// `scales[r]`. Returns false (the float path then runs) when a row holds a NaN or an infinity.
pub(crate) fn quantize(q: &[f32], rows: usize, d: usize, planes: &mut [i8], scales: &mut [f32]) -> bool {
    assert!(q.len() >= rows * d && planes.len() >= 2 * rows * d && scales.len() >= rows, "query buffers too short");
    for r in 0..rows {
        let row = &q[r * d..(r + 1) * d];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        if !amax.is_finite() || row.iter().any(|x| x.is_nan()) {
            return false;
        }
        let s = amax / Q_MAX;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        let (hi, lo) = planes[2 * r * d..(2 * r + 2) * d].split_at_mut(d);
        for ((h, l), &x) in hi.iter_mut().zip(lo.iter_mut()).zip(row) {
            // |x · inv| ≤ 127·256, so q fits; hi = ⌊(q + 128) / 256⌋ ∈ [−127, 127] and
            // lo = q − 256·hi ∈ [−128, 127].
            let q = (x * inv).round() as i32;
            let hv = (q + 128) >> 8;
            (*h, *l) = (hv as i8, (q - 256 * hv) as i8);
        }
        scales[r] = s;
    }
    true
}

/// `acc += Σ` of the products of `a`'s and `b`'s bytes, four per lane (`sdot`).
///
/// # Safety
/// The CPU has `dotprod` (the calling function enables it).
#[inline(always)]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only; the feature is enabled on the calling function.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// `S[r, j] = scale_r · (256·Σ hi_r·K[j] + Σ lo_r·K[j])` for `rows` rows into `st` (row-major,
/// `ld` apart), two rows and four keys at a time (16 accumulators, four key vectors, four
/// query vectors: within the 32 registers).
///
/// # Safety
/// [`available`] returned true; `d` is a multiple of 16 and at most [`MAX_D`]; `k` holds `kn`
/// rows of `d` int8 `ldk` apart; `planes` and `scales` were filled by [`quantize`] for `rows`
/// rows; `st` holds `rows × ld` floats.
#[target_feature(enable = "neon,dotprod")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores(
    k: *const i8,
    ldk: isize,
    planes: *const i8,
    scales: *const f32,
    rows: usize,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
) {
    let mut r0 = 0;
    while r0 < rows {
        // SAFETY: rows r0.. of the planes, scales and st are in range.
        unsafe {
            let (p, s, o) = (planes.add(2 * r0 * d), scales.add(r0), st.add(r0 * ld));
            if rows - r0 >= 2 {
                rows_of::<2>(k, ldk, p, s, d, o, ld, kn);
            } else {
                rows_of::<1>(k, ldk, p, s, d, o, ld, kn);
            }
        }
        r0 += 2;
    }
}

/// [`scores`] for exactly `R` rows: four keys at a time, then one.
///
/// # Safety
/// As for [`scores`], with `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of<const R: usize>(
    k: *const i8,
    ldk: isize,
    planes: *const i8,
    scales: *const f32,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
) {
    // The two sums of a key, as one float: exact integers until the final rounding.
    let combine = |hi: int32x4_t, lo: int32x4_t, scale: f32| -> f32 {
        // SAFETY: register-only NEON (baseline).
        let (h, l) = unsafe { (vaddlvq_s32(hi), vaddlvq_s32(lo)) };
        ((h << 8) + l) as f32 * scale
    };
    // SAFETY: every pointer stays inside the extents the caller vouched for; the features are
    // enabled on the calling function.
    unsafe {
        let plane = |r: usize, half: usize, c: usize| vld1q_s8(planes.add((2 * r + half) * d + c));
        let mut j = 0;
        while j + 4 <= kn {
            let kr = super::row_ptrs::<i8, 4>(k, ldk, j);
            let mut acc = [[[vdupq_n_s32(0); 2]; 4]; R];
            for c in (0..d).step_by(16) {
                let mut kv = [vdupq_n_s8(0); 4];
                for (x, p) in kv.iter_mut().zip(&kr) {
                    *x = vld1q_s8(p.add(c));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let (qh, ql) = (plane(r, 0, c), plane(r, 1, c));
                    for (x, &kt) in a.iter_mut().zip(&kv) {
                        x[0] = sdot(x[0], kt, qh);
                        x[1] = sdot(x[1], kt, ql);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (t, x) in a.iter().enumerate() {
                    *st.add(r * ld + j + t) = combine(x[0], x[1], *scales.add(r));
                }
            }
            j += 4;
        }
        while j < kn {
            let kr = k.offset(j as isize * ldk);
            let mut acc = [[vdupq_n_s32(0); 2]; R];
            for c in (0..d).step_by(16) {
                let kv = vld1q_s8(kr.add(c));
                for (r, x) in acc.iter_mut().enumerate() {
                    x[0] = sdot(x[0], kv, plane(r, 0, c));
                    x[1] = sdot(x[1], kv, plane(r, 1, c));
                }
            }
            for (r, x) in acc.iter().enumerate() {
                *st.add(r * ld + j) = combine(x[0], x[1], *scales.add(r));
            }
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, mut s: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    fn split_queries_recombine_to_the_rounded_row() {
        let (rows, d) = (3, 48);
        let mut q = noise(rows * d, 5);
        q[7] = 0.0;
        q[d + 3] = -q.iter().fold(0f32, |m, x| m.max(x.abs())) * 2.0; // a row's extreme
        let (mut planes, mut scales) = (vec![0i8; 2 * rows * d], vec![0f32; rows]);
        assert!(quantize(&q, rows, d, &mut planes, &mut scales));
        for r in 0..rows {
            for c in 0..d {
                let v = 256 * planes[2 * r * d + c] as i32 + planes[(2 * r + 1) * d + c] as i32;
                let x = q[r * d + c];
                assert!((v as f32 * scales[r] - x).abs() <= scales[r] * 0.5 + 1e-6, "row {r} col {c}");
                assert!(v.abs() <= 127 * 256);
            }
        }
        let mut bad = q.clone();
        bad[d + 1] = f32::NAN;
        assert!(!quantize(&bad, rows, d, &mut planes, &mut scales));
        bad[d + 1] = f32::INFINITY;
        assert!(!quantize(&bad, rows, d, &mut planes, &mut scales));
    }

    #[test]
    fn integer_scores_match_plain_dot_products() {
        if !std::arch::is_aarch64_feature_detected!("dotprod") {
            return;
        }
        for (rows, d, kn) in [(1, 16, 7), (2, 64, 9), (3, 128, 13), (4, 48, 4)] {
            let q = noise(rows * d, d as u64);
            let k: Vec<i8> = noise(kn * d, 99).iter().map(|x| (x * 63.0).clamp(-128.0, 127.0) as i8).collect();
            let (mut planes, mut scales) = (vec![0i8; 2 * rows * d], vec![0f32; rows]);
            assert!(quantize(&q, rows, d, &mut planes, &mut scales));
            let ld = kn + 3;
            let mut st = vec![f32::NAN; rows * ld];
            // SAFETY: the CPU has dotprod (checked); the buffers hold what `scores` reads and writes.
            unsafe {
                scores(k.as_ptr(), d as isize, planes.as_ptr(), scales.as_ptr(), rows, d, st.as_mut_ptr(), ld, kn)
            };
            for r in 0..rows {
                for j in 0..kn {
                    let want: f64 = (0..d).map(|c| q[r * d + c] as f64 * k[j * d + c] as f64).sum();
                    let norm: f64 = (0..d).map(|c| (q[r * d + c] as f64 * k[j * d + c] as f64).abs()).sum();
                    let got = st[r * ld + j] as f64;
                    assert!((got - want).abs() <= 1e-4 * norm, "rows {rows} d {d} row {r} key {j}: {got} vs {want}");
                }
            }
        }
    }
}
