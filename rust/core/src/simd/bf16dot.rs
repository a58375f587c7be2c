//! Products over bf16 pairs with AVX-512 BF16 (`vdpbf16ps`: 32 pairs of bf16 multiplied and
//! summed into 16 f32 lanes per instruction, twice the multiply rate of f32 FMA on Zen 4),
//! and the packing that puts operands into pairs: x86 intrinsics the prefill step calls on
//! its AVX-512 path where [`available`] holds, each an entry point with the features it needs.
//!
//! A product `C += A·B` over a dimension `k` runs on pairs along `k`: A's element `(i, p)` is
//! the 32-bit word holding A[i][2p] and A[i][2p + 1], broadcast to every lane; B's row `p` is
//! the 16-lane vector of words (B[2p][c], B[2p + 1][c]) interleaved. An f32 operand becomes
//! one bf16 part (`terms = 1`) or is split into `hi = bf16(x)` and `lo = bf16(x − hi)` laid
//! out as `terms = 3` segments along `k`, so one product runs hi·hi + hi·lo + lo·hi: the first
//! operand's segments are (hi, hi, lo) and the second's (hi, lo, hi) ([`Side`]). A dimension
//! of odd length is padded with a zero in each segment, on both sides, so no product reads past
//! a row or pairs two segments.

use super::pair_operands::{Pairs, Rows, Side};
use super::vnni::lanes;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Whether this CPU has the instructions used here, and `FERROATTN_BF16DOT=0` does not turn
/// them off (the test suite compares both paths that way).
pub(crate) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("FERROATTN_BF16DOT").map_or(true, |v| v.trim() != "0")
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    })
}

/// Elements `c..c + 16` of row `j` as f32 (lanes past `n` are zero).
///
/// # Safety
/// Row `j` holds `n > c` readable elements; AVX-512F and BW available.
#[inline(always)]
unsafe fn load_row(src: Rows, j: usize, c: usize, n: usize) -> __m512 {
    let m = lanes(n, c);
    // SAFETY: masked loads read only lanes inside the row (the caller's promise).
    unsafe {
        match src {
            Rows::F32(p, ld) => _mm512_maskz_loadu_ps(m, p.offset(j as isize * ld).add(c)),
            Rows::BF16(p, ld) => {
                let h = _mm256_maskz_loadu_epi16(m, p.offset(j as isize * ld).add(c) as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
    }
}

/// The bf16 parts of 16 floats: `hi = bf16(x)` (round to nearest even) and `lo = bf16(x − hi)`.
#[inline(always)]
unsafe fn split(x: __m512) -> (__m256i, __m256i) {
    // SAFETY: register arithmetic; the features are the caller's promise.
    unsafe {
        let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
        let back = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)));
        let lo: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_sub_ps(x, back)));
        (hi, lo)
    }
}

/// Packs `n` rows of `d` elements into bf16 rows `ld` apart at `dst`, pairs along the row:
/// segment `t < terms` of row `j` starts at `j·ld + t·dp` (`dp = d` rounded up to even), with
/// a zero at `d` when `d` is odd.
///
/// # Safety
/// [`available`] returned true; `src` holds `n` rows of `d` readable elements; `dst` holds
/// `n` rows of `ld ≥ terms·dp` elements.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub(crate) unsafe fn pack_rows(src: Rows, n: usize, d: usize, terms: usize, side: Side, dst: *mut u16, ld: usize) {
    let dp = d.next_multiple_of(2);
    // SAFETY: every access stays inside the extents the caller vouched for.
    unsafe {
        for j in 0..n {
            let out = dst.add(j * ld);
            for c in (0..d).step_by(16) {
                let m = lanes(d, c);
                let x = load_row(src, j, c, d);
                if terms == 1 {
                    let hi: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
                    _mm256_mask_storeu_epi16(out.add(c) as *mut i16, m, hi);
                    continue;
                }
                let (hi, lo) = split(x);
                for t in 0..terms {
                    let part = if side.low(t) { lo } else { hi };
                    _mm256_mask_storeu_epi16(out.add(t * dp + c) as *mut i16, m, part);
                }
            }
            if d < dp {
                for t in 0..terms {
                    *out.add(t * dp + d) = 0;
                }
            }
        }
    }
}

/// Packs `n` rows of `w` elements into pairs of consecutive rows, interleaved: the word at
/// `(t·np/2 + j/2)·ld + c` holds rows `j` and `j + 1` of column `c` in segment `t < terms`
/// (`np = n` rounded up to even, the missing row of an odd `n` zero); columns `w..wp` are zero.
/// Values (P·V's B operand) and probabilities (its A operand, stored transposed) take this form.
///
/// # Safety
/// [`available`] returned true; `src` holds `n` rows of `w` readable elements; `dst` holds
/// `terms·np/2` rows of `ld ≥ wp` words; `wp ≥ w` is a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_row_pairs(
    src: Rows,
    n: usize,
    w: usize,
    wp: usize,
    terms: usize,
    side: Side,
    dst: *mut u32,
    ld: usize,
) {
    let half = n.div_ceil(2);
    // SAFETY: every access stays inside the extents the caller vouched for.
    unsafe {
        let idx = _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const __m512i);
        for jp in 0..half {
            let j = 2 * jp;
            for c in (0..wp).step_by(16) {
                let (x0, x1) = if c < w {
                    let x1 = if j + 1 < n { load_row(src, j + 1, c, w) } else { _mm512_setzero_ps() };
                    (load_row(src, j, c, w), x1)
                } else {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                };
                let out = dst.add(jp * ld + c);
                if terms == 1 {
                    // One rounding of both rows at once (row j's values in the low half).
                    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(x1, x0));
                    _mm512_storeu_si512(out as *mut __m512i, _mm512_permutexvar_epi16(idx, both));
                    continue;
                }
                let ((h0, l0), (h1, l1)) = (split(x0), split(x1));
                for t in 0..terms {
                    let word = if side.low(t) { pairs_of(idx, l0, l1) } else { pairs_of(idx, h0, h1) };
                    _mm512_storeu_si512(out.add(t * half * ld) as *mut __m512i, word);
                }
            }
        }
    }
}

/// Two rows' 16 bf16 each as 16 words of pairs (row `a`'s value in the low half of each).
#[inline(always)]
unsafe fn pairs_of(idx: __m512i, a: __m256i, b: __m256i) -> __m512i {
    // SAFETY: register operations; the features are the caller's promise.
    unsafe { _mm512_permutexvar_epi16(idx, _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)) }
}

/// The permutation that interleaves the halves of 32 bf16: word `c` takes element `c` of the
/// low half and element `c` of the high half.
const INTERLEAVE: [i16; 32] = {
    let mut idx = [0i16; 32];
    let mut c = 0;
    while c < 16 {
        idx[2 * c] = c as i16;
        idx[2 * c + 1] = c as i16 + 16;
        c += 1;
    }
    idx
};

/// `C[m×n] = scale · A[m×k2]·B[k2×n]` (or `C += A·B` with `accumulate`, `scale` then unused)
/// over `k2` pair words; B's rows are `ldb` words apart, C's rows `ldc` floats apart.
///
/// # Safety
/// [`available`] returned true; `n` is a multiple of 16; every addressed element is valid and
/// C overlaps neither A nor B.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
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
    debug_assert!(n.is_multiple_of(16));
    let at = |i: usize| Pairs { p: a.p.wrapping_offset(i as isize * a.rs), ..a };
    let mut i = 0;
    // SAFETY: each call covers rows i..i + R of A and C, inside m.
    unsafe {
        while i + 6 <= m {
            block::<6>(at(i), b, ldb, c.add(i * ldc), ldc, n, k2, scale, accumulate);
            i += 6;
        }
        let (ai, ci) = (at(i), c.add(i * ldc));
        match m - i {
            1 => block::<1>(ai, b, ldb, ci, ldc, n, k2, scale, accumulate),
            2 => block::<2>(ai, b, ldb, ci, ldc, n, k2, scale, accumulate),
            3 => block::<3>(ai, b, ldb, ci, ldc, n, k2, scale, accumulate),
            4 => block::<4>(ai, b, ldb, ci, ldc, n, k2, scale, accumulate),
            5 => block::<5>(ai, b, ldb, ci, ldc, n, k2, scale, accumulate),
            _ => {}
        }
    }
}

/// [`gemm`] for exactly `R` rows: strips of four vectors, then one vector at a time. Six rows
/// × four vectors keep 24 accumulators, four B vectors and a broadcast in AVX-512's 32
/// registers, as the f32 micro-kernel does.
///
/// # Safety
/// As for [`gemm`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize>(
    a: Pairs,
    b: *const u32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    n: usize,
    k2: usize,
    scale: f32,
    accumulate: bool,
) {
    let main = n - n % 64;
    // SAFETY: forwarded; both calls stay inside columns 0..n.
    unsafe {
        strips::<R, 4>(a, b, ldb, c, ldc, 0, main, k2, scale, accumulate);
        strips::<R, 1>(a, b, ldb, c, ldc, main, n, k2, scale, accumulate);
    }
}

/// Columns `j0..j1` of [`block`] in strips of `NV` vectors.
///
/// # Safety
/// As for [`gemm`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strips<const R: usize, const NV: usize>(
    a: Pairs,
    b: *const u32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    j0: usize,
    j1: usize,
    k2: usize,
    scale: f32,
    accumulate: bool,
) {
    // SAFETY: indices stay inside the extents the caller vouched for; the intrinsics' features
    // are enabled on the entry point this inlines into.
    unsafe {
        for j in (j0..j1).step_by(NV * 16) {
            let mut acc = [[_mm512_setzero_ps(); NV]; R];
            let (mut ap, mut bp) = (a.p, b.add(j));
            for _ in 0..k2 {
                // Plain loops, not `array::from_fn` (see `gemm`'s f32 micro-kernel).
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_si512(bp.add(v * 16) as *const __m512i);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(ap.offset(r as isize * a.rs).read_unaligned() as i32));
                    for (x, &bx) in row.iter_mut().zip(&bv) {
                        *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(bx));
                    }
                }
                ap = ap.offset(a.ks);
                bp = bp.add(ldb);
            }
            let sv = _mm512_set1_ps(scale);
            for (r, row) in acc.iter().enumerate() {
                for (v, &x) in row.iter().enumerate() {
                    let out = c.add(r * ldc + j + v * 16);
                    let y = if accumulate { _mm512_add_ps(_mm512_loadu_ps(out), x) } else { _mm512_mul_ps(x, sv) };
                    _mm512_storeu_ps(out, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn bits(x: f32) -> u16 {
        bf16::from_f32(x).to_bits()
    }

    /// The packed words of rows pairs hold what the layout promises, odd counts padded with 0.
    #[test]
    fn row_pairs_interleave_rows_and_pad_odd_counts() {
        if !available() {
            return;
        }
        for (n, w) in [(3usize, 5usize), (4, 16), (5, 33), (1, 1)] {
            let src: Vec<f32> = (0..n * w).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
            let wp = w.next_multiple_of(16);
            for (terms, side) in [(1, Side::First), (3, Side::First), (3, Side::Second)] {
                let half = n.div_ceil(2);
                let mut dst = vec![u32::MAX; terms * half * wp];
                // SAFETY: the buffers are sized as the function requires; `available` holds.
                unsafe {
                    pack_row_pairs(Rows::F32(src.as_ptr(), w as isize), n, w, wp, terms, side, dst.as_mut_ptr(), wp)
                };
                for t in 0..terms {
                    for jp in 0..half {
                        for c in 0..wp {
                            let part = |j: usize| -> u16 {
                                if j >= n || c >= w {
                                    return 0;
                                }
                                let x = src[j * w + c];
                                let hi = bits(x);
                                if side.low(t) {
                                    bits(x - bf16::from_bits(hi).to_f32())
                                } else {
                                    hi
                                }
                            };
                            let word = dst[(t * half + jp) * wp + c];
                            assert_eq!(
                                word,
                                part(2 * jp) as u32 | (part(2 * jp + 1) as u32) << 16,
                                "n {n} w {w} t {t}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Rows packed along D (odd D padded with a zero per segment), from f32 and from bf16.
    #[test]
    fn rows_split_into_segments_with_odd_widths_padded() {
        if !available() {
            return;
        }
        for d in [1usize, 7, 16, 17, 40] {
            let n = 3;
            let src: Vec<f32> = (0..n * d).map(|i| (i as f32 * 1.37).cos() / 7.0).collect();
            let src16: Vec<u16> = src.iter().map(|&x| bits(x)).collect();
            let dp = d.next_multiple_of(2);
            let ld = 3 * dp + 2;
            for (rows, exact) in
                [(Rows::F32(src.as_ptr(), d as isize), false), (Rows::BF16(src16.as_ptr(), d as isize), true)]
            {
                let mut dst = vec![u16::MAX; n * ld];
                // SAFETY: as above.
                unsafe { pack_rows(rows, n, d, 3, Side::Second, dst.as_mut_ptr(), ld) };
                for j in 0..n {
                    for c in 0..dp {
                        let x = if c < d {
                            if exact {
                                bf16::from_bits(src16[j * d + c]).to_f32()
                            } else {
                                src[j * d + c]
                            }
                        } else {
                            0.0
                        };
                        let hi = bits(x);
                        let lo = bits(x - bf16::from_bits(hi).to_f32());
                        assert_eq!(
                            [dst[j * ld + c], dst[j * ld + dp + c], dst[j * ld + 2 * dp + c]],
                            [hi, lo, hi],
                            "d {d}"
                        );
                        if exact {
                            assert_eq!(lo, 0);
                        }
                    }
                }
            }
        }
    }

    /// The product of packed operands equals the f64 sum of the bf16 parts' three products,
    /// for every row count (the 6-row blocks and each remainder) and both strip widths.
    #[test]
    fn gemm_matches_the_product_of_the_parts() {
        if !available() {
            return;
        }
        for (m, n, k) in [(13usize, 80usize, 9usize), (6, 64, 2), (5, 16, 33)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
            let kp = k.next_multiple_of(2);
            let mut ap = vec![0u16; m * 3 * kp];
            let mut bp = vec![0u32; 3 * kp / 2 * n];
            let mut c = vec![0f32; m * n];
            // SAFETY: buffers sized as the functions require; `available` holds.
            unsafe {
                pack_rows(Rows::F32(a.as_ptr(), k as isize), m, k, 3, Side::First, ap.as_mut_ptr(), 3 * kp);
                // B's rows are the k rows of n columns: pairs of rows along k.
                pack_row_pairs(Rows::F32(b.as_ptr(), n as isize), k, n, n, 3, Side::Second, bp.as_mut_ptr(), n);
                let pa = Pairs { p: ap.as_ptr() as *const u32, rs: (3 * kp / 2) as isize, ks: 1 };
                gemm(pa, bp.as_ptr(), n, c.as_mut_ptr(), n, m, n, 3 * kp / 2, 2.0, false);
            }
            for i in 0..m {
                for j in 0..n {
                    // hi·hi + hi·lo + lo·hi of the parts, exactly: only f32 sums differ.
                    let parts = |x: f32| {
                        let hi = bf16::from_f32(x).to_f32();
                        (hi as f64, bf16::from_f32(x - hi).to_f32() as f64)
                    };
                    let want: f64 = (0..k)
                        .map(|t| {
                            let ((ah, al), (bh, bl)) = (parts(a[i * k + t]), parts(b[t * n + j]));
                            ah * bh + ah * bl + al * bh
                        })
                        .sum::<f64>()
                        * 2.0;
                    let got = c[i * n + j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "m {m} n {n} k {k}: {got} vs {want}");
                }
            }
        }
    }

    /// The ceiling of the products: `vdpbf16ps` and `vfmadd231ps` on independent accumulators,
    /// one core (`cargo test --release -p ferroattn-core -- --ignored --nocapture rate`).
    /// Zen 4 (docs/performance.md, "bf16 dot products"): one instruction per cycle each, so
    /// bf16 pairs multiply twice as many values per second as f32 FMA, not more.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn rate_of_bf16_pairs_and_f32_fma() {
        #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
        fn run(n: usize, bf16: bool) -> f32 {
            // SAFETY: register operations only; the features are enabled here and checked by
            // the caller.
            unsafe {
                let a: __m512bh = std::mem::transmute(std::hint::black_box(_mm512_set1_epi32(0x3f80_3f80)));
                let x = std::hint::black_box(_mm512_set1_ps(0.999));
                let mut acc = [_mm512_setzero_ps(); 12];
                for _ in 0..n {
                    for y in acc.iter_mut() {
                        *y = if bf16 { _mm512_dpbf16_ps(*y, a, a) } else { _mm512_fmadd_ps(*y, x, x) };
                    }
                }
                acc.iter().fold(0.0, |s, &y| s + _mm512_reduce_add_ps(y))
            }
        }
        if !available() {
            return;
        }
        let n = 2_000_000;
        for bf16 in [true, false, true, false] {
            let t = std::time::Instant::now();
            // SAFETY: `available` checked the features.
            std::hint::black_box(unsafe { run(n, bf16) });
            let rate = (n * 12) as f64 / t.elapsed().as_secs_f64() / 1e9;
            let (name, macs) = if bf16 { ("vdpbf16ps", 32.0) } else { ("vfmadd231ps", 16.0) };
            println!("{name}: {rate:.2} G instructions/s, {:.1} G multiply-adds/s", rate * macs);
        }
    }
}
