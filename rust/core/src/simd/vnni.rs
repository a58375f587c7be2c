//! int8 keys against 16-bit queries, and int8 values against 16-bit probabilities, with
//! integer dot products (AVX-512 VNNI): x86 intrinsics the decode path calls on its AVX-512
//! path where [`available`] holds, each an entry point with the features it needs.
//!
//! Widening int8 keys to f32 costs two instructions per 16 elements before the multiply, and
//! with a whole GQA group per key that arithmetic, not memory, bounds decoding. `vpdpwssd`
//! multiplies 32 pairs of 16-bit integers and accumulates into 32-bit lanes in one
//! instruction, so keys are only sign-extended to 16 bits and each query row is rounded to
//! 16 bits with its own scale (`max |q| / 32767`: a relative error of ~1.5e-5 per element,
//! two orders below the int8 rounding of the keys themselves).

use super::x86::Avx512;
use super::{row_ptrs, Prefetch, Simd};
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Widest head [`scores`] takes: each 32-bit lane sums `d / 16` products of at most
/// 127 · 32767, which stays below 2³¹ up to here.
pub(crate) const MAX_D: usize = 4096;

/// Whether this CPU has the instructions [`scores`] uses (and `FERROATTN_VNNI=0` does not turn
/// them off: the test suite runs the float int8 path that way too).
pub(crate) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("FERROATTN_VNNI").map_or(true, |v| v.trim() != "0")
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    })
}

/// Rounds `rows` query rows of `d` floats to 16-bit integers, one scale per row, 16 lanes at
/// a time (once per task, one element at a time it was a third of a short decode call);
/// returns false (leaving the float path to run) when a row holds a NaN or an infinity, or
/// where [`available`] does not hold.
pub(crate) fn quantize(q: &[f32], rows: usize, d: usize, q16: &mut [i16], scales: &mut [f32]) -> bool {
    assert!(q.len() >= rows * d && q16.len() >= rows * d && scales.len() >= rows, "query buffers too short");
    // SAFETY: the CPU has the features (checked); the lengths were checked above.
    available() && unsafe { quantize_rows(q.as_ptr(), rows, d, q16.as_mut_ptr(), scales.as_mut_ptr()) }
}

/// [`quantize`] one element at a time: the rounding the vector version reproduces.
#[cfg(test)]
fn quantize_plain(q: &[f32], rows: usize, d: usize, q16: &mut [i16], scales: &mut [f32]) -> bool {
    for r in 0..rows {
        let row = &q[r * d..(r + 1) * d];
        let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        if !amax.is_finite() || row.iter().any(|x| x.is_nan()) {
            return false;
        }
        let s = amax / 32767.0;
        let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
        for (o, &x) in q16[r * d..(r + 1) * d].iter_mut().zip(row) {
            // Half away from zero by truncation (`f32::round` is a libm call on baseline x86-64);
            // |x · inv| ≤ 32767, so the cast cannot saturate.
            let y = x * inv;
            *o = (y + 0.5f32.copysign(y)) as i16;
        }
        scales[r] = s;
    }
    true
}

/// The lanes of a 16-element vector at element `c` of a run of `n` (masked loads and stores
/// of a row's tail, here and in `bf16dot`).
#[inline(always)]
pub(crate) fn lanes(n: usize, c: usize) -> __mmask16 {
    if n - c >= 16 {
        0xffff
    } else {
        (1u16 << (n - c)) - 1
    }
}

/// The 16-bit rounding scale of `n` floats at `p` (their largest magnitude over 32767) and its
/// inverse in every lane; `None` when one of them is NaN or infinite.
///
/// # Safety
/// [`available`] returned true; `n` floats readable at `p`.
#[inline(always)]
unsafe fn scale_of(p: *const f32, n: usize) -> Option<(f32, __m512)> {
    // SAFETY: loads masked to the n floats; the features are enabled on the calling function.
    unsafe {
        let (mut mx, mut bad) = (_mm512_setzero_ps(), 0u16);
        for c in (0..n).step_by(16) {
            let x = _mm512_maskz_loadu_ps(lanes(n, c), p.add(c));
            bad |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
        }
        let amax = Avx512::reduce_max(mx);
        if bad != 0 || !amax.is_finite() {
            return None;
        }
        let s = amax / 32767.0;
        Some((s, _mm512_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 })))
    }
}

/// [`quantize`]'s work, with the same operations in the same order as the plain loop the
/// tests compare it with (`quantize_plain`), so the same results.
///
/// # Safety
/// [`available`] returned true; `q` and `q16` hold `rows × d` elements, `scales` `rows`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn quantize_rows(q: *const f32, rows: usize, d: usize, q16: *mut i16, scales: *mut f32) -> bool {
    // SAFETY: every load and store is masked to the row's d elements.
    unsafe {
        for r in 0..rows {
            let row = q.add(r * d);
            let Some((s, inv)) = scale_of(row, d) else {
                return false;
            };
            let (half, sign) = (_mm512_set1_epi32(0.5f32.to_bits() as i32), _mm512_set1_epi32(i32::MIN));
            for c in (0..d).step_by(16) {
                let y = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(d, c), row.add(c)), inv);
                let h = _mm512_or_si512(half, _mm512_and_si512(_mm512_castps_si512(y), sign));
                let w = _mm512_cvttps_epi32(_mm512_add_ps(y, _mm512_castsi512_ps(h)));
                _mm512_mask_cvtsepi32_storeu_epi16(q16.add(r * d + c), lanes(d, c), w);
            }
            *scales.add(r) = s;
        }
    }
    true
}

/// `S[r, j] = scale_r · Σ q16[r]·K[j]` for `rows` rows into `st` (row-major, `ld` apart);
/// `pf` requests the key rows ahead on the first pass.
///
/// # Safety
/// [`available`] returned true; `d` is a multiple of 32; `k` holds `kn` rows of `d` int8
/// `ldk` apart; `q16` holds `rows × d` values, `scales` `rows`; `st` holds `rows × ld` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores(
    k: *const i8,
    ldk: isize,
    q16: *const i16,
    scales: *const f32,
    rows: usize,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) {
    for (r0, m, pf) in pf.passes(rows, 4) {
        // SAFETY: rows r0..r0 + m of q16, scales and st are in range.
        unsafe {
            let (q, s, o) = (q16.add(r0 * d), scales.add(r0), st.add(r0 * ld));
            match m {
                1 => rows_of::<1>(k, ldk, q, s, d, o, ld, kn, pf),
                2 => rows_of::<2>(k, ldk, q, s, d, o, ld, kn, pf),
                3 => rows_of::<3>(k, ldk, q, s, d, o, ld, kn, pf),
                _ => rows_of::<4>(k, ldk, q, s, d, o, ld, kn, pf),
            }
        }
    }
}

/// [`scores`] for exactly `R` rows: four keys at a time (4·R accumulators), then one.
///
/// # Safety
/// As for [`scores`], with `R` rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_of<const R: usize>(
    k: *const i8,
    ldk: isize,
    q: *const i16,
    scales: *const f32,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) {
    // SAFETY: every pointer stays inside the extents the caller vouched for; the features are
    // enabled on the calling function.
    unsafe {
        let widen = |p: *const i8| _mm512_cvtepi8_epi16(_mm256_loadu_si256(p as *const __m256i));
        let qv = |r: usize, c: usize| _mm512_loadu_si512(q.add(r * d + c) as *const __m512i);
        let exact = d <= EXACT_D;
        let mut j = 0;
        while j + 4 <= kn {
            // As in the float path: the keys a few rows on are requested (first pass only).
            pf.ahead(j, 4);
            let kr = row_ptrs::<i8, 4>(k, ldk, j);
            let mut acc = [[_mm512_setzero_si512(); 4]; R];
            for c in (0..d).step_by(32) {
                let mut kv = [_mm512_setzero_si512(); 4];
                for (x, p) in kv.iter_mut().zip(&kr) {
                    *x = widen(p.add(c));
                }
                for (r, a) in acc.iter_mut().enumerate() {
                    let qr = qv(r, c);
                    for (x, &kt) in a.iter_mut().zip(&kv) {
                        *x = _mm512_dpwssd_epi32(*x, kt, qr);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                if exact {
                    let sums = _mm_cvtepi32_ps(sums4(a[0], a[1], a[2], a[3]));
                    _mm_storeu_ps(st.add(r * ld + j), _mm_mul_ps(sums, _mm_set1_ps(*scales.add(r))));
                } else {
                    let s = _mm512_set1_ps(*scales.add(r));
                    let f = |x: __m512i| _mm512_mul_ps(_mm512_cvtepi32_ps(x), s);
                    Avx512::store_sums4(f(a[0]), f(a[1]), f(a[2]), f(a[3]), st.add(r * ld + j));
                }
            }
            j += 4;
        }
        while j < kn {
            let kr = k.offset(j as isize * ldk);
            let mut acc = [_mm512_setzero_si512(); R];
            for c in (0..d).step_by(32) {
                let kv = widen(kr.add(c));
                for (r, x) in acc.iter_mut().enumerate() {
                    *x = _mm512_dpwssd_epi32(*x, kv, qv(r, c));
                }
            }
            for (r, &x) in acc.iter().enumerate() {
                // Lanes summed as floats: an integer sum of all 16 could overflow for wide heads.
                *st.add(r * ld + j) = Avx512::reduce_sum(_mm512_cvtepi32_ps(x)) * *scales.add(r);
            }
            j += 1;
        }
    }
}

/// Widest head whose whole dot product fits an `i32`: `d` products of at most 127 · 32767.
const EXACT_D: usize = 512;

/// The four sums of the 16 lanes of `a`, `b`, `c` and `d`, in that order, added as integers.
#[inline(always)]
unsafe fn sums4(a: __m512i, b: __m512i, c: __m512i, d: __m512i) -> __m128i {
    // SAFETY: register-only intrinsics; the features are enabled on the calling function.
    unsafe {
        // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3], then [a, b, c, d] partial sums;
        // then the four lanes are added.
        let ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
        let cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
        let abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
        let h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64::<1>(abcd));
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }
}

/// Rounds a row of probabilities (value scales already folded in) to 16 bits with one scale
/// per row and tile, packed two keys to a 32-bit word (key `2i` low, `2i + 1` high), as
/// `vpdpwssd` pairs them in [`pv_i8`]. Returns the scale, or `None` when a probability is NaN
/// or infinite: the float path then carries it to the output.
///
/// # Safety
/// [`available`] returned true; `p` holds `kp` floats, a multiple of 16 (zeros past the last
/// key); `pairs` has room for `kp / 2` words.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn pack_probs(p: *const f32, kp: usize, pairs: *mut i32) -> Option<f32> {
    // SAFETY: kp floats at p and kp / 2 words at pairs (the caller's promise).
    unsafe {
        let (s, inv) = scale_of(p, kp)?;
        for c in (0..kp).step_by(16) {
            // |x · inv| ≤ 32767: the narrowing cannot saturate.
            let y = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p.add(c)), inv));
            _mm256_storeu_si256(pairs.add(c / 2) as *mut __m256i, _mm512_cvtepi32_epi16(y));
        }
        Some(s)
    }
}

/// `acc[r] += scale_r · Σ_j P16[r, j] · V[j]` for `rows` rows (≤ 4) and `kn` int8 value rows
/// of `dv` elements (a multiple of 32), with `vpdpwssd` on pairs of keys; `pf` requests the
/// value rows ahead during the first column strip.
///
/// # Safety
/// [`available`] returned true; `pairs` holds `rows` rows of `kn.div_ceil(2)` words `ldp`
/// apart, `scales` `rows` floats; `v` holds `kn` rows of `dv` int8 `ldv` apart; `acc` holds
/// `rows` rows of `dv` floats `ldc` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv_i8(
    pairs: *const i32,
    ldp: usize,
    scales: *const f32,
    rows: usize,
    v: *const i8,
    ldv: isize,
    dv: usize,
    kn: usize,
    acc: *mut f32,
    ldc: usize,
    pf: Prefetch,
) {
    // SAFETY: forwarded; each call covers rows inside 0..rows.
    unsafe {
        match rows {
            1 => pv_rows::<1>(pairs, ldp, scales, v, ldv, dv, kn, acc, ldc, pf),
            2 => pv_rows::<2>(pairs, ldp, scales, v, ldv, dv, kn, acc, ldc, pf),
            3 => pv_rows::<3>(pairs, ldp, scales, v, ldv, dv, kn, acc, ldc, pf),
            _ => pv_rows::<4>(pairs, ldp, scales, v, ldv, dv, kn, acc, ldc, pf),
        }
    }
}

/// [`pv_i8`] for exactly `R` rows, 32 value columns at a time.
///
/// # Safety
/// As for [`pv_i8`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<const R: usize>(
    pairs: *const i32,
    ldp: usize,
    scales: *const f32,
    v: *const i8,
    ldv: isize,
    dv: usize,
    kn: usize,
    acc: *mut f32,
    ldc: usize,
    pf: Prefetch,
) {
    let npairs = kn.div_ceil(2);
    // SAFETY: every pointer stays inside the extents the caller vouched for; the features are
    // enabled on the calling function.
    unsafe {
        let widen = |j: usize, c: usize| {
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(v.offset(j as isize * ldv).add(c) as *const __m256i))
        };
        for c in (0..dv).step_by(32) {
            // Per 128-bit lane L, `lo` holds columns 8L..8L+3 and `hi` 8L+4..8L+7, each as
            // the pair (key 2i, key 2i + 1) that `vpdpwssd` multiplies by P's pair.
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for i in 0..npairs {
                // The first strip is the first read of these rows: the values further on are
                // requested from memory as it goes.
                if c == 0 {
                    pf.ahead(2 * i, 2);
                }
                // An odd last key pairs with zeros.
                let a = widen(2 * i, c);
                let b = if 2 * i + 1 < kn { widen(2 * i + 1, c) } else { _mm512_setzero_si512() };
                let (l, h) = (_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b));
                for r in 0..R {
                    let p = _mm512_set1_epi32(*pairs.add(r * ldp + i));
                    lo[r] = _mm512_dpwssd_epi32(lo[r], l, p);
                    hi[r] = _mm512_dpwssd_epi32(hi[r], h, p);
                }
            }
            for r in 0..R {
                add_scaled(lo[r], hi[r], *scales.add(r), acc.add(r * ldc + c));
            }
        }
    }
}

/// Keys per probability scale in [`pv_one`]: a tile's worth.
pub(crate) const PV_BLOCK: usize = 128;

/// [`pv_i8`] for one row, keys outer: each value row is read whole and in address order, the
/// order the hardware prefetchers follow, and every column of a 256-wide strip stays in
/// registers across a block of keys. Keys `PV_BLOCK · b ..` were rounded with `scales[b]`.
///
/// # Safety
/// As for [`pv_i8`] with one row, and one scale per [`PV_BLOCK`] keys.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv_one(
    pairs: *const i32,
    scales: *const f32,
    v: *const i8,
    ldv: isize,
    dv: usize,
    kn: usize,
    acc: *mut f32,
    pf: Prefetch,
) {
    let mut c0 = 0;
    while c0 < dv {
        let pf = if c0 == 0 { pf } else { Prefetch::NONE };
        // SAFETY: columns c0.. of V and of acc; the caller's extents.
        unsafe {
            let (v, acc) = (v.add(c0), acc.add(c0));
            match (dv - c0).min(256) / 32 {
                1 => pv_cols::<1>(pairs, scales, v, ldv, kn, acc, pf),
                2 => pv_cols::<2>(pairs, scales, v, ldv, kn, acc, pf),
                3 => pv_cols::<3>(pairs, scales, v, ldv, kn, acc, pf),
                4 => pv_cols::<4>(pairs, scales, v, ldv, kn, acc, pf),
                5 => pv_cols::<5>(pairs, scales, v, ldv, kn, acc, pf),
                6 => pv_cols::<6>(pairs, scales, v, ldv, kn, acc, pf),
                7 => pv_cols::<7>(pairs, scales, v, ldv, kn, acc, pf),
                _ => pv_cols::<8>(pairs, scales, v, ldv, kn, acc, pf),
            }
        }
        c0 += 256;
    }
}

/// [`pv_one`] over `32 · W` columns.
///
/// # Safety
/// As for [`pv_one`], with `32 · W` columns at `v` and `acc`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_cols<const W: usize>(
    pairs: *const i32,
    scales: *const f32,
    v: *const i8,
    ldv: isize,
    kn: usize,
    acc: *mut f32,
    pf: Prefetch,
) {
    // SAFETY: every pointer stays inside the extents the caller vouched for; the features are
    // enabled on the calling function.
    unsafe {
        let widen = |row: *const i8, c: usize| _mm512_cvtepi8_epi16(_mm256_loadu_si256(row.add(c) as *const __m256i));
        for k0 in (0..kn).step_by(PV_BLOCK) {
            let k1 = kn.min(k0 + PV_BLOCK);
            let mut lo = [_mm512_setzero_si512(); W];
            let mut hi = [_mm512_setzero_si512(); W];
            for j in (k0..k1).step_by(2) {
                pf.ahead(j, 2);
                // `b` is read only when key j + 1 exists.
                let a = v.offset(j as isize * ldv);
                let b = a.wrapping_offset(ldv);
                let p = _mm512_set1_epi32(*pairs.add(j / 2));
                for s in 0..W {
                    // An odd last key pairs with zeros.
                    let x = widen(a, 32 * s);
                    let y = if j + 1 < k1 { widen(b, 32 * s) } else { _mm512_setzero_si512() };
                    lo[s] = _mm512_dpwssd_epi32(lo[s], _mm512_unpacklo_epi16(x, y), p);
                    hi[s] = _mm512_dpwssd_epi32(hi[s], _mm512_unpackhi_epi16(x, y), p);
                }
            }
            for c in 0..W {
                add_scaled(lo[c], hi[c], *scales.add(k0 / PV_BLOCK), acc.add(32 * c));
            }
        }
    }
}

/// `out[0..32] += scale · sums`, where `lo` and `hi` hold the integer sums of 32 columns as
/// the unpacked pairs leave them: per 128-bit lane L, `lo` columns 8L..8L+3 and `hi`
/// 8L+4..8L+7. The lanes `[l0 l1 l2 l3]` and `[h0 h1 h2 h3]` go back into column order as
/// `[l0 h0 l1 h1]` (columns 0..15) and `[l2 h2 l3 h3]` (16..31).
///
/// # Safety
/// `out` holds 32 floats; the features are enabled on the calling function.
#[inline(always)]
unsafe fn add_scaled(lo: __m512i, hi: __m512i, scale: f32, out: *mut f32) {
    // SAFETY: 32 floats at out (the caller's promise); the rest works on registers.
    unsafe {
        let (l, h, s) = (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi), _mm512_set1_ps(scale));
        let first = _mm512_shuffle_f32x4::<0b11_01_10_00>(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(l, h),
            _mm512_shuffle_f32x4::<0b01_00_01_00>(l, h),
        );
        let second = _mm512_shuffle_f32x4::<0b11_01_10_00>(
            _mm512_shuffle_f32x4::<0b11_10_11_10>(l, h),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(l, h),
        );
        _mm512_storeu_ps(out, _mm512_fmadd_ps(first, s, _mm512_loadu_ps(out)));
        _mm512_storeu_ps(out.add(16), _mm512_fmadd_ps(second, s, _mm512_loadu_ps(out.add(16))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible numbers in [-1, 1) (xorshift; the crate has no random-number dependency).
    fn noise(n: usize, mut s: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn int8(x: &[f32]) -> Vec<i8> {
        x.iter().map(|v| (v * 127.0) as i8).collect()
    }

    #[test]
    fn vector_rounding_of_queries_matches_the_plain_one() {
        if !available() {
            return;
        }
        for (rows, d) in [(1, 16), (4, 128), (3, 37), (2, 100), (8, 64), (1, 5)] {
            let mut q = noise(rows * d, 7);
            // Exact halves after scaling, zeros of both signs, and a row of zeros.
            q[0] = 1.0;
            if d > 2 {
                q[1] = 0.5 / 32767.0;
                q[2] = -0.0;
            }
            if rows > 1 {
                q[d..2 * d].fill(0.0);
            }
            let (mut a, mut sa) = (vec![7i16; rows * d], vec![0f32; rows]);
            let (mut b, mut sb) = (vec![-7i16; rows * d], vec![0f32; rows]);
            assert!(quantize(&q, rows, d, &mut a, &mut sa));
            assert!(quantize_plain(&q, rows, d, &mut b, &mut sb));
            assert_eq!(a, b, "rows {rows} d {d}");
            assert_eq!(sa, sb, "rows {rows} d {d}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut q = q.clone();
                q[rows * d - 1] = bad;
                assert!(!quantize(&q, rows, d, &mut a, &mut sa), "{bad} in the last row");
            }
        }
    }

    #[test]
    fn integer_scores_match_plain_dot_products() {
        if !available() {
            return;
        }
        // 37 keys: nine groups of four and one single key; 6 rows: a pass of 4 and one of 2;
        // a head summed as integers and one too wide for that.
        for d in [64, EXACT_D + 32] {
            integer_scores_of_width(d);
        }
    }

    fn integer_scores_of_width(d: usize) {
        let (kn, rows, ld) = (37, 6, 48);
        let k = int8(&noise(kn * d, 1));
        let q = noise(rows * d, 2);
        let (mut q16, mut qs) = (vec![0i16; rows * d], vec![0f32; rows]);
        assert!(quantize(&q, rows, d, &mut q16, &mut qs));
        let mut st = vec![f32::NAN; rows * ld];
        // SAFETY: features checked by `available`; every extent matches the arrays above.
        unsafe {
            scores(k.as_ptr(), d as isize, q16.as_ptr(), qs.as_ptr(), rows, d, st.as_mut_ptr(), ld, kn, Prefetch::NONE)
        };
        for r in 0..rows {
            for j in 0..kn {
                let want: f64 = (0..d).map(|c| q[r * d + c] as f64 * k[j * d + c] as f64).sum();
                // Each query element is off by at most half its row's scale.
                let tol = d as f64 * 127.0 * qs[r] as f64 * 0.5 + 1e-4;
                let got = st[r * ld + j] as f64;
                assert!((got - want).abs() <= tol, "d {d} row {r} key {j}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn integer_pv_matches_plain_sums_in_column_order() {
        if !available() {
            return;
        }
        // 37 keys (an odd last pair), 64 columns (two strips of 32), 1 to 4 rows.
        let (dv, kn, kp) = (64, 37, 48);
        let v = int8(&noise(kn * dv, 3));
        for rows in 1..=4 {
            let mut p = vec![0f32; rows * kp];
            for (r, row) in p.chunks_mut(kp).enumerate() {
                let x = noise(kn, 10 + r as u64);
                row[..kn].iter_mut().zip(&x).for_each(|(o, y)| *o = (y + 1.0) * 0.5);
            }
            let (mut pairs, mut scales) = (vec![0i32; rows * kp / 2], vec![0f32; rows]);
            for (r, s) in scales.iter_mut().enumerate() {
                // SAFETY: features checked; row r holds kp floats, pairs kp / 2 words.
                *s = unsafe { pack_probs(p[r * kp..].as_ptr(), kp, pairs[r * kp / 2..].as_mut_ptr()) }.unwrap();
            }
            let mut acc = vec![1.0f32; rows * dv];
            // SAFETY: features checked; every extent matches the arrays above.
            unsafe {
                pv_i8(
                    pairs.as_ptr(),
                    kp / 2,
                    scales.as_ptr(),
                    rows,
                    v.as_ptr(),
                    dv as isize,
                    dv,
                    kn,
                    acc.as_mut_ptr(),
                    dv,
                    Prefetch::NONE,
                )
            };
            for r in 0..rows {
                for c in 0..dv {
                    let want: f64 = 1.0 + (0..kn).map(|j| p[r * kp + j] as f64 * v[j * dv + c] as f64).sum::<f64>();
                    // Each probability is off by at most half its row's scale.
                    let tol = kn as f64 * 127.0 * scales[r] as f64 * 0.5 + 1e-4;
                    let got = acc[r * dv + c] as f64;
                    assert!((got - want).abs() <= tol, "rows {rows}: row {r} column {c}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn one_row_pv_matches_plain_sums_in_column_order() {
        if !available() {
            return;
        }
        // One row, keys outer: odd and even key counts, more than one block of keys (each
        // with its own scale), value widths of one strip, of a whole 256-column chunk, and of
        // a chunk plus three strips (two calls of the chunk loop).
        for (dv, kn) in [(32usize, 5usize), (256, 37), (352, 300), (96, 1), (64, 129)] {
            let kp = kn.div_ceil(16) * 16;
            let v = int8(&noise(kn * dv, 7));
            let mut p = vec![0f32; kp];
            p[..kn].iter_mut().zip(&noise(kn, 11)).for_each(|(o, y)| *o = (y + 1.0) * 0.5);
            // Blocks of very different size, so a wrong block's scale shows.
            p.iter_mut().skip(PV_BLOCK).for_each(|x| *x *= 1e-3);
            let mut pairs = vec![0i32; kp / 2];
            let scales: Vec<f32> = (0..kp.div_ceil(PV_BLOCK))
                .map(|b| {
                    let (k0, n) = (b * PV_BLOCK, PV_BLOCK.min(kp - b * PV_BLOCK));
                    // SAFETY: features checked; p holds kp floats, pairs kp / 2 words.
                    unsafe { pack_probs(p[k0..].as_ptr(), n, pairs[k0 / 2..].as_mut_ptr()) }.unwrap()
                })
                .collect();
            let mut acc = vec![1.0f32; dv];
            // SAFETY: features checked; every extent matches the arrays above.
            unsafe {
                pv_one(
                    pairs.as_ptr(),
                    scales.as_ptr(),
                    v.as_ptr(),
                    dv as isize,
                    dv,
                    kn,
                    acc.as_mut_ptr(),
                    Prefetch::NONE,
                )
            };
            for c in 0..dv {
                let want: f64 = 1.0 + (0..kn).map(|j| p[j] as f64 * v[j * dv + c] as f64).sum::<f64>();
                let tol: f64 = (0..kn).map(|j| 127.0 * scales[j / PV_BLOCK] as f64 * 0.5).sum::<f64>() + 1e-4;
                let got = acc[c] as f64;
                assert!((got - want).abs() <= tol, "dv {dv}, {kn} keys: column {c}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn probabilities_that_are_not_finite_are_refused() {
        if !available() {
            return;
        }
        let mut pairs = [0i32; 8];
        for bad in [f32::NAN, f32::INFINITY] {
            let mut p = [0.5f32; 16];
            p[7] = bad;
            // SAFETY: features checked; 16 floats and 8 words.
            assert!(unsafe { pack_probs(p.as_ptr(), 16, pairs.as_mut_ptr()) }.is_none());
        }
    }
}
