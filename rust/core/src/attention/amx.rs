//! int8 key scores on AMX tiles (Intel Sapphire Rapids and later), for GQA groups.
//!
//! With several query rows per KV head the int8 scores are bound by arithmetic, not by memory:
//! on the VNNI path four rows cost about 24 vector instructions per key at D = 128. One
//! `tdpbssd` multiplies a 16-key × 64-byte tile of keys, loaded straight from the cache's
//! rows, by a 64 × 2R tile of query bytes. So a block of 16 keys costs D / 64 instructions
//! for the whole group.
//!
//! The queries keep the 16 bits of [`super::vnni::quantize`]: each is split as
//! `q = 256·hi + lo` with both halves signed bytes, and `hi` and `lo` are two columns of the
//! query tile, so one instruction gives both sums and the scores are exactly the VNNI path's.

use super::vnni;
use crate::simd::Prefetch;
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Key-dimension bytes per tile row, and keys per block (tile rows).
const CHUNK: usize = 64;
const BLOCK: usize = 16;

/// Widest head: four query tiles (tiles 0–3), next to two key tiles and two result tiles.
pub(crate) const MAX_D: usize = 4 * CHUNK;

/// Most query rows: a query tile row holds 2R four-byte columns in 64 bytes.
pub(crate) const MAX_ROWS: usize = 8;

/// Whether [`scores`] applies to `rows` rows of width `d`.
pub(crate) fn fits(rows: usize, d: usize) -> bool {
    (2..=MAX_ROWS).contains(&rows) && d.is_multiple_of(CHUNK) && d <= MAX_D && available()
}

/// Whether this CPU and OS let the process use AMX-INT8 (and `FERROATTN_AMX=0` does not turn
/// it off: the test suite also runs without it). Linux grants the tile state per process on
/// request; elsewhere it is not used.
pub(crate) fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::env::var("FERROATTN_AMX").map_or(true, |v| v.trim() != "0") && vnni::available() && granted()
    })
}

/// CPUID's AMX-TILE and AMX-INT8 bits, the OS's tile state enabled in XCR0, and the kernel's
/// permission for this process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
#[cfg(target_os = "linux")]
fn granted() -> bool {
    // SAFETY: CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller); XGETBV
    // only after CPUID says the OS uses XSAVE; the system call only asks for a permission.
    unsafe {
        let edx = __cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 25) == 0 || __cpuid(1).ecx & (1 << 27) == 0 {
            return false;
        }
        if xcr0() & (3 << 17) != 3 << 17 {
            return false;
        }
        let ret: isize;
        // arch_prctl (158) with ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18).
        asm!("syscall", inlateout("rax") 158isize => ret, in("rdi") 0x1023usize, in("rsi") 18usize,
             lateout("rcx") _, lateout("r11") _, options(nostack));
        ret == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn granted() -> bool {
    false
}

#[cfg(target_os = "linux")]
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller checked that the OS uses XSAVE.
    unsafe { _xgetbv(0) }
}

/// Bytes of the query tiles for `rows` rows of width `d` (see [`split_queries`]).
pub(crate) fn query_bytes(rows: usize, d: usize) -> usize {
    d * 2 * rows
}

/// Lays out 16-bit queries (`rows × d`) as the query tiles: per 64-column chunk, 16 rows of
/// 2·rows four-byte groups, where group `n` holds four consecutive columns of row `n`'s high
/// byte (`n < rows`) or of row `n − rows`'s low byte. Needs `|q| ≤ 32639` (`quantize`'s range),
/// so that `hi = ⌊(q + 128) / 256⌋` and `lo = q − 256·hi` are both signed bytes.
pub(crate) fn split_queries(q16: &[i16], rows: usize, d: usize, out: &mut [i8]) {
    let cols = 2 * rows;
    for r in 0..rows {
        for (c, &q) in q16[r * d..(r + 1) * d].iter().enumerate() {
            let hi = (i32::from(q) + 128) >> 8;
            let lo = i32::from(q) - 256 * hi;
            let (chunk, row, byte) = (c / CHUNK, (c % CHUNK) / 4, c % 4);
            let at = |n: usize| ((chunk * BLOCK + row) * cols + n) * 4 + byte;
            out[at(r)] = hi as i8;
            out[at(rows + r)] = lo as i8;
        }
    }
}

/// The tile shapes: query tiles 0–3 (16 rows of 8R bytes), key tiles 4 and 5 (16 × 64), result
/// tiles 6 and 7 (16 keys × 2R sums), in the 64-byte layout `ldtilecfg` reads.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new(rows: usize) -> Config {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let set = |c: &mut [u8; 64], t: usize, bytes: usize| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&(bytes as u16).to_le_bytes());
            c[48 + t] = BLOCK as u8;
        };
        for t in 0..4 {
            set(&mut c, t, 8 * rows);
        }
        set(&mut c, 4, CHUNK);
        set(&mut c, 5, CHUNK);
        set(&mut c, 6, 8 * rows);
        set(&mut c, 7, 8 * rows);
        Config(c)
    }
}

/// Loads tile `T` from 16 rows `stride` bytes apart.
#[inline(always)]
unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
    // SAFETY: the caller's promise: 16 rows of the tile's width readable at p.
    unsafe {
        asm!("tileloadd tmm{t}, [{p} + {s}]", t = const T, p = in(reg) p, s = in(reg) stride, options(nostack, readonly, preserves_flags))
    }
}

/// Tile `C` += tile `A` · tile `B`, signed bytes, 32-bit sums.
#[inline(always)]
unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
    // SAFETY: registers only; the tiles were configured.
    unsafe {
        asm!("tdpbssd tmm{c}, tmm{a}, tmm{b}", c = const C, a = const A, b = const B, options(nostack, nomem, preserves_flags))
    }
}

/// One block of 16 keys at `k` into result tile `C`: `n` chunks of 64 bytes, the key tiles
/// alternating so a load does not wait for the product before it.
#[inline(always)]
unsafe fn block<const C: u8>(k: *const i8, ldk: usize, n: usize) {
    // SAFETY: the caller's promise: 16 rows of n·64 bytes at k, ldk apart; tiles configured.
    unsafe {
        asm!("tilezero tmm{c}", c = const C, options(nostack, nomem, preserves_flags));
        let kb = k as *const u8;
        load::<4>(kb, ldk);
        dot::<C, 4, 0>();
        if n > 1 {
            load::<5>(kb.add(CHUNK), ldk);
            dot::<C, 5, 1>();
        }
        if n > 2 {
            load::<4>(kb.add(2 * CHUNK), ldk);
            dot::<C, 4, 2>();
        }
        if n > 3 {
            load::<5>(kb.add(3 * CHUNK), ldk);
            dot::<C, 5, 3>();
        }
    }
}

/// Stores result tile `C` (16 rows of `bytes`) at `p`.
#[inline(always)]
unsafe fn store<const C: u8>(p: *mut i32, bytes: usize) {
    // SAFETY: the caller's promise: 16 × bytes writable at p.
    unsafe {
        asm!("tilestored [{p} + {s}], tmm{c}", c = const C, p = in(reg) p, s = in(reg) bytes, options(nostack, preserves_flags))
    }
}

/// One block's sums (`sums`: 16 keys × 2·rows columns, high halves first) into 16 scores per
/// row at `st` (rows `ld` apart).
#[inline(always)]
unsafe fn convert(sums: *const i32, rows: usize, scales: *const f32, st: *mut f32, ld: usize) {
    // SAFETY: the caller's promise: 16 × 2·rows sums, `rows` scales, rows × 16 scores.
    unsafe {
        // Lane j of a gather reads key j's sum for one column.
        let idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(2 * rows as i32),
        );
        for r in 0..rows {
            let hi = _mm512_i32gather_epi32::<4>(idx, sums.add(r));
            let lo = _mm512_i32gather_epi32::<4>(idx, sums.add(rows + r));
            let sum = _mm512_add_epi32(_mm512_slli_epi32::<8>(hi), lo);
            _mm512_storeu_ps(st.add(r * ld), _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(*scales.add(r))));
        }
    }
}

/// `S[r, j] = scale_r · Σ q16[r]·K[j]` for keys `0..16·⌊kn / 16⌋` (returned; the caller does the
/// rest) into `st` (row-major, `ld` apart), from the query tiles of [`split_queries`].
///
/// # Safety
/// [`fits`]`(rows, d)` returned true; `k` holds `kn` rows of `d` int8 `ldk` apart; `qt` holds
/// [`query_bytes`]`(rows, d)` bytes; `scales` `rows` floats; `st` `rows × ld` floats.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn scores(
    k: *const i8,
    ldk: isize,
    qt: *const i8,
    scales: *const f32,
    rows: usize,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) -> usize {
    let blocks = kn / BLOCK;
    if blocks == 0 || ldk <= 0 {
        return 0;
    }
    let (n, ldk, cols) = (d / CHUNK, ldk as usize, 2 * rows);
    let cfg = Config::new(rows);
    let mut sums = [0i32; BLOCK * 2 * MAX_ROWS];
    // SAFETY: the tiles are configured before use and released after; every load reads rows
    // the caller vouched for; the stores write `sums`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
        let qb = qt as *const u8;
        let qstride = 8 * rows;
        let chunk_bytes = BLOCK * qstride;
        load::<0>(qb, qstride);
        if n > 1 {
            load::<1>(qb.add(chunk_bytes), qstride);
        }
        if n > 2 {
            load::<2>(qb.add(2 * chunk_bytes), qstride);
        }
        if n > 3 {
            load::<3>(qb.add(3 * chunk_bytes), qstride);
        }
        // Block b's products run while block b − 1's sums are stored and converted.
        for b in 0..=blocks {
            if b < blocks {
                pf.ahead(b * BLOCK, BLOCK);
                let kb = k.add(b * BLOCK * ldk);
                if b % 2 == 0 {
                    block::<6>(kb, ldk, n);
                } else {
                    block::<7>(kb, ldk, n);
                }
            }
            if b > 0 {
                let s = sums.as_mut_ptr();
                if b % 2 == 1 {
                    store::<6>(s, 4 * cols);
                } else {
                    store::<7>(s, 4 * cols);
                }
                convert(s, rows, scales, st.add((b - 1) * BLOCK), ld);
            }
        }
        static REL: OnceLock<bool> = OnceLock::new();
        if *REL.get_or_init(|| std::env::var("AMX_REL").map_or(true, |v| v != "0")) {
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        }
    }
    blocks * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_halves_rebuild_every_query_in_range() {
        let q: Vec<i16> = (-32639..=32639).step_by(7).chain([-32639, 32639, 0, -1, 1, 127, 128, -128, -129]).collect();
        let d = 64;
        for row in q.chunks(d).filter(|c| c.len() == d) {
            let mut out = vec![0i8; query_bytes(1, d)];
            split_queries(row, 1, d, &mut out);
            for (c, &x) in row.iter().enumerate() {
                let at = |n: usize| (((c % CHUNK) / 4) * 2 + n) * 4 + c % 4;
                assert_eq!(256 * i32::from(out[at(0)]) + i32::from(out[at(1)]), i32::from(x));
            }
        }
    }

    #[test]
    fn tile_scores_match_plain_sums() {
        if !available() {
            eprintln!("AMX-INT8 not available here: skipped");
            return;
        }
        for (rows, d, kn) in [(2, 64, 16), (4, 128, 37), (8, 256, 64), (3, 192, 33), (5, 128, 100)] {
            let ldk = d + 64;
            let k: Vec<i8> = (0..kn * ldk).map(|i| ((i * 37 + 11) % 255) as i32 - 127).map(|x| x as i8).collect();
            let q16: Vec<i16> = (0..rows * d).map(|i| (((i * 7919) % 65279) as i32 - 32639) as i16).collect();
            let scales: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32 * 0.25).collect();
            let mut qt = vec![0i8; query_bytes(rows, d)];
            split_queries(&q16, rows, d, &mut qt);
            let ld = kn.div_ceil(16) * 16 + 16;
            let mut st = vec![f32::NAN; rows * ld];
            // SAFETY: shapes as built above; fits() holds for these sizes.
            let done = unsafe {
                assert!(fits(rows, d));
                scores(
                    k.as_ptr(),
                    ldk as isize,
                    qt.as_ptr(),
                    scales.as_ptr(),
                    rows,
                    d,
                    st.as_mut_ptr(),
                    ld,
                    kn,
                    Prefetch::NONE,
                )
            };
            assert_eq!(done, kn / 16 * 16);
            for r in 0..rows {
                for j in 0..done {
                    let exact: i64 = (0..d).map(|c| i64::from(q16[r * d + c]) * i64::from(k[j * ldk + c])).sum();
                    assert_eq!(st[r * ld + j], exact as f32 * scales[r], "row {r} key {j} (d {d})");
                }
                assert!(st[r * ld + done..r * ld + ld].iter().all(|x| x.is_nan()), "wrote past the blocks");
            }
        }
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    static SPIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    #[test]
    #[ignore]
    fn time_scores() {
        assert!(available());
        let kn: usize = std::env::var("KN").map_or(128, |v| v.parse().unwrap());
        let (rows, d, ldk) = (4usize, 128usize, 128usize);
        let heads: usize = std::env::var("HEADS").map_or(64, |v| v.parse().unwrap());
        let k: Vec<i8> = (0..heads * kn * ldk).map(|i| (i % 251) as i8).collect();
        let q16: Vec<i16> = (0..rows * d).map(|i| (i * 977 % 30000) as i16).collect();
        let scales = vec![1.0f32; rows];
        let mut qt = vec![0i8; query_bytes(rows, d)];
        split_queries(&q16, rows, d, &mut qt);
        let ld = kn;
        let mut st = vec![0f32; rows * ld];
        for mode in [4, 5, 4, 5, 4, 5] {
            let t = std::time::Instant::now();
            let reps = 128000 * 128 / heads / kn;
            for _ in 0..reps {
                for h in 0..heads {
                    let kp = k.as_ptr().wrapping_add(h * kn * ldk);
                    unsafe {
                        if mode == 1 {
                            scores(
                                kp,
                                ldk as isize,
                                qt.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                        } else if mode == 2 {
                            scores(
                                kp,
                                ldk as isize,
                                qt.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                            vnni::scores(
                                kp,
                                ldk as isize,
                                q16.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                        } else if mode == 4 || mode == 5 {
                            if mode == 4 {
                                scores(
                                    kp,
                                    ldk as isize,
                                    qt.as_ptr(),
                                    scales.as_ptr(),
                                    rows,
                                    d,
                                    st.as_mut_ptr(),
                                    ld,
                                    kn,
                                    Prefetch::NONE,
                                );
                            } else {
                                vnni::scores(
                                    kp,
                                    ldk as isize,
                                    q16.as_ptr(),
                                    scales.as_ptr(),
                                    rows,
                                    d,
                                    st.as_mut_ptr(),
                                    ld,
                                    kn,
                                    Prefetch::NONE,
                                );
                            }
                            let t0 = std::time::Instant::now();
                            let mut x = 1u64;
                            for i in 0..2000u64 {
                                x = std::hint::black_box(x.wrapping_mul(3).wrapping_add(i));
                            }
                            std::hint::black_box(x);
                            SPIN.fetch_add(t0.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                        } else if mode == 3 {
                            vnni::scores(
                                kp,
                                ldk as isize,
                                q16.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                            vnni::scores(
                                kp,
                                ldk as isize,
                                q16.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                        } else {
                            vnni::scores(
                                kp,
                                ldk as isize,
                                q16.as_ptr(),
                                scales.as_ptr(),
                                rows,
                                d,
                                st.as_mut_ptr(),
                                ld,
                                kn,
                                Prefetch::NONE,
                            );
                        }
                    }
                }
            }
            let ns = t.elapsed().as_secs_f64() * 1e9 / (reps * heads * kn) as f64;
            let spin = SPIN.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 / (reps * heads) as f64;
            eprintln!("spin loop {spin:.1} ns per call");
            eprintln!("mode {mode}: {ns:.2} ns per key ({} KiB of keys)", heads * kn * ldk / 1024);
        }
    }
}
