//! Vector primitives and the instruction-set choice.
//!
//! Kernels are written once, generic over [`Simd`], and marked `#[inline(always)]`; each ISA gets
//! a `#[target_feature]` entry point that instantiates them (the table in `dispatch`), so one
//! binary built for the baseline target runs the best path the CPU offers. The path is chosen
//! once per process ([`Isa::active`]); `FERROATTN_ISA=scalar|avx2|avx512|neon` forces a path
//! (lower ones only: a path the CPU lacks is refused and the best available one is used instead).
//! Intrinsics beyond the [`Simd`] trait that one kernel needs (the integer products of VNNI on
//! x86-64 and of `sdot` on aarch64) live here too, in their own files, so the algorithms hold no
//! architecture-specific code.

use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
pub(crate) mod bf16dot;
pub(crate) mod dispatch;
#[cfg(target_arch = "aarch64")]
pub(crate) mod dotprod;
pub(crate) mod elem;
pub(crate) mod exp2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
// Off x86-64 no pair unit exists yet (aarch64's `bfdot`/`bfmmla` would be one), so the
// table and its operand types are compiled but never reached there.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) mod pair_operands;
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) mod pairs;
pub use pairs::bf16_dot;
pub(crate) mod scalar;
#[cfg(target_arch = "x86_64")]
pub(crate) mod vnni;
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

pub(crate) use dispatch::kernel_entry;

/// The widest `LANES` of any ISA: buffers padded to multiples of it fit every path.
pub(crate) const MAX_LANES: usize = 16;

/// `x` rounded up to a multiple of `m`.
pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// The vector operations the kernels need, over `LANES` f32 values.
///
/// # Safety
/// Implementations may use instructions the CPU must support: callers only instantiate a
/// kernel with a type whose [`Isa`] was detected at run time.
pub(crate) unsafe trait Simd: Copy {
    const LANES: usize;
    /// Vector registers the ISA has: kernels size their register tiles by it (AVX2 has 16,
    /// AVX-512 and NEON 32).
    const REGISTERS: usize = 16;
    type V: Copy;
    fn zero() -> Self::V;
    fn splat(x: f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for reading `LANES` floats.
    unsafe fn load(p: *const f32) -> Self::V;
    /// # Safety
    /// `p` must be valid for writing `LANES` floats.
    unsafe fn store(p: *mut f32, v: Self::V);
    /// `a * b + c`, fused where the ISA has FMA.
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    fn add(a: Self::V, b: Self::V) -> Self::V;
    fn sub(a: Self::V, b: Self::V) -> Self::V;
    fn max(a: Self::V, b: Self::V) -> Self::V;
    /// `2^x`, ~1 ulp on the range softmax uses; exactly 0 below −126, NaN kept.
    fn exp2(x: Self::V) -> Self::V;
    /// Sum of the lanes.
    fn reduce_sum(v: Self::V) -> f32;
    /// Largest lane (NaN lanes may or may not win: callers treat a NaN score as poisoning the
    /// row either way).
    fn reduce_max(v: Self::V) -> f32;
    /// The lane sums of four vectors, stored as four consecutive floats at `p`: one shuffle
    /// tree shared by four dot products instead of four full horizontal sums.
    ///
    /// # Safety
    /// `p` must be valid for writing 4 floats.
    unsafe fn store_sums4(a: Self::V, b: Self::V, c: Self::V, d: Self::V, p: *mut f32);
    /// `LANES` IEEE half floats (as bits), widened.
    ///
    /// # Safety
    /// `p` must be valid for reading `LANES` values.
    unsafe fn load_f16(p: *const u16) -> Self::V;
    /// `LANES` bfloat16 values (as bits), widened.
    ///
    /// # Safety
    /// As for [`Simd::load_f16`].
    unsafe fn load_bf16(p: *const u16) -> Self::V;
    /// `LANES` signed bytes, converted.
    ///
    /// # Safety
    /// As for [`Simd::load_f16`].
    unsafe fn load_i8(p: *const i8) -> Self::V;
}

/// An instruction-set path for the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    /// AArch64 Advanced SIMD, 4 lanes (baseline on every AArch64 CPU).
    Neon,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    pub fn from_name(name: &str) -> Option<Isa> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" | "portable" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512f" => Some(Isa::Avx512),
            "neon" => Some(Isa::Neon),
            _ => None,
        }
    }

    /// Every path this CPU can run, lowest first.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            if avx2 {
                v.push(Isa::Avx2);
            }
            if avx2 && std::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Isa::Neon);
        }
        v
    }

    /// The path in use: the best available, or `FERROATTN_ISA` when it names an available one.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let avail = Isa::available();
            let best = *avail.last().expect("scalar is always available");
            match std::env::var("FERROATTN_ISA") {
                Ok(name) if !name.trim().is_empty() => match Isa::from_name(&name) {
                    Some(isa) if avail.contains(&isa) => isa,
                    _ => best,
                },
                _ => best,
            }
        })
    }
}

/// CPU features relevant to the kernels that this CPU reports.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::is_x86_feature_detected!($f) { found.push($f); } )*};
        }
        probe!("sse4.1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512bf16", "avx512fp16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        // neon runs the kernels; fp16 and bf16 (arithmetic in those types), dotprod and i8mm
        // (int8 dot and matrix products) and sve are reported for `ferroattn info`.
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::arch::is_aarch64_feature_detected!($f) { found.push($f); } )*};
        }
        probe!("neon", "fp16", "dotprod", "bf16", "i8mm", "sve");
    }
    found
}

/// Pointers to rows `j..j + N` of `p`, `ld` elements apart.
#[inline(always)]
pub(crate) fn row_ptrs<T, const N: usize>(p: *const T, ld: isize, j: usize) -> [*const T; N] {
    // A plain loop, not `array::from_fn`, whose closure is not always inlined into the
    // `#[target_feature]` callers.
    let mut out = [p; N];
    for (t, o) in out.iter_mut().enumerate() {
        *o = p.wrapping_offset((j + t) as isize * ld);
    }
    out
}

/// See [`Prefetch::passes`].
pub(crate) struct Passes {
    pf: Prefetch,
    rows: usize,
    pass: usize,
    r0: usize,
}

impl Iterator for Passes {
    type Item = (usize, usize, Prefetch);

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.r0 >= self.rows {
            return None;
        }
        let (r0, m) = (self.r0, self.pass.min(self.rows - self.r0));
        self.r0 += m;
        Some((r0, m, if r0 == 0 { self.pf } else { Prefetch::NONE }))
    }
}

#[cfg(target_arch = "x86_64")]
const HINT_L1: i32 = std::arch::x86_64::_MM_HINT_T0;
#[cfg(target_arch = "x86_64")]
const HINT_L2: i32 = std::arch::x86_64::_MM_HINT_T1;
#[cfg(not(target_arch = "x86_64"))]
const HINT_L1: i32 = 3;
#[cfg(not(target_arch = "x86_64"))]
const HINT_L2: i32 = 2;

/// How far ahead of its use a row of a stream read in order is requested, in bytes of the
/// stream. The best distance depends on the core's prefetchers, so it is picked by vendor from
/// measurements with 128-wide heads (`docs/performance.md`, "Stream requests and their
/// distance by vendor"): on Zen 4, 8 KiB beat 4 and 16 KiB; on a Xeon with AVX-512 and AMX,
/// 3 KiB beat 2, 4 and 8 KiB (GQA float caches 11–17% faster than at 8 KiB, int8 level;
/// one-row fp32 and fp16 streams 12–20% slower at 6–8 KiB, int8 up to 4% faster: "One-row
/// streams and ONE_ROW_KEYS").
fn stream_ahead_bytes() -> usize {
    static AHEAD: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *AHEAD.get_or_init(|| if intel() { 3 << 10 } else { 8 << 10 })
}

/// Whether a single query row's K and V streams (a decode step without GQA), read in long
/// runs of whole rows, are also requested ahead, on the AVX-512 path (`avx512`) or another.
/// On the Xeon's AVX-512 path they read 17–27% faster with the requests (fp32, fp16 and int8,
/// 4096 and 32768 keys); on its AVX2 path fp32 read 10% slower. On Zen 4 the runs without
/// requests beat 128-key tiles with them (runs with requests were not measured there), so
/// other CPUs keep the runs without.
pub(crate) fn request_one_row_streams(avx512: bool) -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    avx512 && *INTEL.get_or_init(intel)
}

/// How decoding requests its K and V streams ahead on this CPU, for reports such as
/// `ferroattn.info()`: bytes of a stream requested ahead, and whether one query row's streams
/// (a decode step without GQA) are requested too, on the SIMD path in use.
pub fn stream_requests() -> (usize, bool) {
    (stream_ahead_bytes(), request_one_row_streams(Isa::active() == Isa::Avx512))
}

/// Whether the CPU is an Intel one (CPUID's vendor string).
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        // "GenuineIntel", in the order EBX, EDX, ECX.
        (id.ebx, id.edx, id.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows to fetch into cache ahead of use: first row, bytes between rows, bytes per row, and
/// how many rows ahead [`Prefetch::ahead`] requests.
#[derive(Clone, Copy)]
pub(crate) struct Prefetch {
    pub first: *const u8,
    pub ld_bytes: isize,
    pub row_bytes: usize,
    lead: usize,
}

impl Prefetch {
    pub(crate) const NONE: Prefetch = Prefetch { first: std::ptr::null(), ld_bytes: 0, row_bytes: 0, lead: 0 };

    /// Rows of `row` elements at `p`, `ld` elements apart.
    pub(crate) fn of<E>(p: *const E, ld: isize, row: usize) -> Prefetch {
        let size = size_of::<E>();
        let row_bytes = row * size;
        let lead = (stream_ahead_bytes() / row_bytes.max(1)).max(1);
        Prefetch { first: p as *const u8, ld_bytes: ld * size as isize, row_bytes, lead }
    }

    /// How many rows ahead of the one being read [`Prefetch::ahead`] requests.
    pub(crate) fn lead(&self) -> usize {
        self.lead
    }

    /// Decoding's streaming step: rows `j..j + n` are about to be read, in order, once; the
    /// rows a fixed distance further on are requested into L2.
    ///
    /// Each stream is requested while it is being read, a few rows per step, so requests to
    /// memory go out at the pace of the arithmetic, K's during the scores and V's during
    /// P·V. Requesting a whole tile at a time (the next tile's keys and this tile's values,
    /// all during the scores) left memory idle during P·V and stalled the scores behind
    /// requests the core could not yet take. Nothing for [`Prefetch::NONE`].
    #[inline(always)]
    pub(crate) fn ahead(&self, j: usize, n: usize) {
        self.rows_l2(j + self.lead, n)
    }

    /// `rows` rows split into passes of at most `pass` (as many as keep their accumulators in
    /// registers), as `(first row, rows, prefetch)`: the prefetch goes with the first pass
    /// only, since later passes read the same rows (keys or values) again.
    pub(crate) fn passes(self, rows: usize, pass: usize) -> Passes {
        Passes { pf: self, rows, pass, r0: 0 }
    }

    /// Rows `j0..j0 + n` of `first` (a hint: never faults, any address allowed).
    ///
    /// Decoding streams K and V once; the V tile is read column strip by column strip, which
    /// the hardware prefetchers follow poorly, so its rows are requested while the scores of
    /// the same keys are computed, a few lines per key instead of a burst the CPU would drop.
    #[inline(always)]
    pub(crate) fn rows(&self, j0: usize, n: usize) {
        self.rows_to::<{ HINT_L1 }>(j0, n)
    }

    /// As [`Prefetch::rows`], into the second-level cache only: for rows used after a
    /// first-level cache's worth of other data has streamed by.
    #[inline(always)]
    pub(crate) fn rows_l2(&self, j0: usize, n: usize) {
        self.rows_to::<{ HINT_L2 }>(j0, n)
    }

    #[inline(always)]
    fn rows_to<const HINT: i32>(&self, j0: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if !self.first.is_null() {
            for j in j0..j0 + n {
                let row = self.first.wrapping_offset(j as isize * self.ld_bytes) as *const i8;
                for off in (0..self.row_bytes).step_by(64) {
                    // SAFETY: prefetch is a hint that never faults; SSE is x86-64 baseline.
                    unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(row.wrapping_add(off)) };
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        if !self.first.is_null() {
            for j in j0..j0 + n {
                let row = self.first.wrapping_offset(j as isize * self.ld_bytes);
                for off in (0..self.row_bytes).step_by(64) {
                    let p = row.wrapping_add(off);
                    // SAFETY: `prfm` is a hint that never faults, whatever the address; it reads
                    // and writes no memory the program sees.
                    unsafe {
                        if HINT == HINT_L1 {
                            std::arch::asm!("prfm pldl1keep, [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
                        } else {
                            std::arch::asm!("prfm pldl2keep, [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
                        }
                    }
                }
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let _ = (j0, n);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn vendor_check_agrees_with_the_kernel() {
        let info = std::fs::read_to_string("/proc/cpuinfo").expect("/proc/cpuinfo");
        let vendor = info.lines().find_map(|l| l.strip_prefix("vendor_id")).expect("a vendor_id line");
        let vendor = vendor.trim_start_matches([' ', '\t', ':']).trim();
        assert_eq!(super::intel(), vendor == "GenuineIntel", "vendor_id {vendor:?}");
    }
}
