//! Linear attention (Katharopoulos et al. 2020): `out_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps)` with
//! `S = Σ_j φ(k_j) v_jᵀ` and `z = Σ_j φ(k_j)`, over all keys or (causal) over `j ≤ i`.
//!
//! Cost is `O(N·D·Dv)` and nothing of size `N×N` exists. The normalizer rides along with the
//! values: every value row gets a trailing 1, so the state `[S | z]` is one `D × (Dv+1)` matrix,
//! one product gives numerator and denominator, and one product updates both.
//!
//! The causal form is a chunked scan: per chunk of [`CHUNK`] tokens, the part before the chunk
//! comes from the running state (`φ(Q_c)·[S|z]`), the part inside it from a small masked product
//! (`tril(φ(Q_c)φ(K_c)ᵀ)·[V_c|1]`), then the state absorbs the chunk. All products are the
//! register-blocked [`gemm`] of the softmax kernels, instantiated per ISA through the kernel
//! table (`simd::kernel_entry!`).
//!
//! Work is split over (batch, KV head) units, each carrying the query heads that share its state
//! (GQA). When there are fewer units than threads, a unit's tokens are cut into segments: the
//! state contribution of every segment is computed in parallel, prefix-summed, and each segment
//! is then scanned from its own starting state — a quarter more arithmetic for full parallelism.

use crate::error::{ensure_shape, Error, Result};
use crate::gemm::{gemm, A, B, C};
use crate::layout::{check_qkv, DType, RowWriter, Strided, StridedMut};
use crate::memory::{mul, product, zeroed, Alloc, NoMemory};
use crate::parallel;
use crate::simd::{kernel_entry, round_up, Isa, Simd, MAX_LANES};
use rayon::prelude::*;

/// Tokens per chunk of the causal scan: the masked intra-chunk product costs `CHUNK·(D+Dv)` per
/// token against `D·Dv` for the state, so 64 keeps it at most comparable for head dims ≥ 64,
/// and 64 is a multiple of every ISA's lane count (the score tile needs no padding).
const CHUNK: usize = 64;

/// The elementwise feature map φ applied to queries and keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureMap {
    /// `elu(x) + 1`: positive everywhere, so denominators never vanish.
    Elu1,
    /// `max(x, 0)`: a query or key with no positive entry gives a zero denominator (the output
    /// is then `0 / eps = 0`).
    Relu,
}

impl FeatureMap {
    pub fn from_name(name: &str) -> Option<FeatureMap> {
        match name {
            "elu1" => Some(FeatureMap::Elu1),
            "relu" => Some(FeatureMap::Relu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FeatureMap::Elu1 => "elu1",
            FeatureMap::Relu => "relu",
        }
    }

    /// In place; NaN stays NaN. `elu(x) + 1 = max(x, 0) + exp(min(x, 0))`, vectorized: a
    /// scalar `exp` per element cost more than all the products of a chunk.
    #[inline(always)]
    fn apply<S: Simd>(self, x: &mut [f32]) {
        match self {
            FeatureMap::Elu1 => {
                let l = S::LANES;
                let body = x.len() - x.len() % l;
                let (zero, log2e) = (S::zero(), S::splat(std::f32::consts::LOG2_E));
                for c in (0..body).step_by(l) {
                    // SAFETY: `c + LANES ≤ x.len()`.
                    unsafe {
                        let p = x.as_mut_ptr().add(c);
                        let v = S::load(p);
                        let pos = S::max(zero, v);
                        // `v − pos` is `min(v, 0)`, and NaN when `v` is, whatever `max` did.
                        let e = S::exp2(S::fma(S::sub(v, pos), log2e, zero));
                        S::store(p, S::add(pos, e));
                    }
                }
                x[body..].iter_mut().for_each(|v| *v = if *v > 0.0 { *v + 1.0 } else { v.exp() });
            }
            FeatureMap::Relu => x.iter_mut().for_each(|v| *v = if *v <= 0.0 { 0.0 } else { *v }),
        }
    }
}

/// Options of [`linear_attention`].
#[derive(Clone, Copy, Debug)]
pub struct LinearParams {
    /// Query `i` sees keys `j ≤ i` only (needs as many queries as keys).
    pub causal: bool,
    pub feature_map: FeatureMap,
    /// Added to every denominator; must be positive and finite.
    pub eps: f32,
}

impl LinearParams {
    pub fn new(causal: bool, feature_map: FeatureMap) -> LinearParams {
        LinearParams { causal, feature_map, eps: 1e-6 }
    }
}

/// A recurrent state to start a causal call from and to leave its end in: `s` is
/// `(B, Hkv, D, Dv)` and `z` is `(B, Hkv, D)`, both C-contiguous.
pub struct LinearState<'a> {
    pub s: &'a mut [f32],
    pub z: &'a mut [f32],
}

/// Sizes shared by every task of a call.
#[derive(Clone, Copy, Debug)]
struct Dims {
    hkv: usize,
    group: usize,
    n: usize,
    d: usize,
    dv: usize,
    /// Row length of the extended values and of the state: `Dv + 1` padded.
    dvp: usize,
}

impl Dims {
    /// Floats of one state (`d × dvp`; `check` made sure the product fits).
    fn state_len(&self) -> usize {
        self.d * self.dvp
    }
}

/// What the refusals of working memory name: the arguments whose sizes ask for it.
const LINEAR_MEMORY: &str = "q, k and v (the kernels' working memory)";

/// The value row length with its trailing 1, padded (`None`: beyond a 64-bit size).
fn padded_values(dv: usize) -> Option<usize> {
    dv.checked_add(1)?.checked_next_multiple_of(MAX_LANES)
}

/// What every task reads and where it writes.
struct Ctx<'a> {
    q: &'a Strided<'a>,
    k: &'a Strided<'a>,
    v: &'a Strided<'a>,
    out: RowWriter<'a>,
    params: LinearParams,
    dims: Dims,
}

/// One task: tokens `t0..t1` of unit `unit` (= `batch · Hkv + kv head`).
enum Job<'a> {
    /// `state = Σ φ(k_j)[v_j|1]ᵀ` over the range (overwritten).
    Delta { state: &'a mut [f32] },
    /// The causal scan: `state` enters as the state before `t0` and leaves as the state after
    /// `t1`; output rows `t0..t1` of every query head of the unit are written.
    Scan { state: &'a mut [f32] },
    /// Non-causal output rows `t0..t1` of every query head of the unit against `state`.
    Rows { state: &'a [f32] },
}

/// Per-worker buffers.
struct Scratch {
    /// φ of a chunk of queries / keys, row-major `CHUNK × d`.
    fq: Vec<f32>,
    fk: Vec<f32>,
    /// φ of the keys transposed, `d × CHUNK`.
    fkt: Vec<f32>,
    /// Values with a trailing 1 and zero padding, `CHUNK × dvp`.
    vx: Vec<f32>,
    /// Masked scores, `CHUNK × CHUNK`.
    a: Vec<f32>,
    /// Numerators and (column `dv`) denominators, `CHUNK × dvp`.
    o: Vec<f32>,
    row: Vec<f32>,
}

impl Scratch {
    fn new(dims: &Dims) -> Alloc<Scratch> {
        let (keys, values) = (mul(CHUNK, dims.d)?, mul(CHUNK, dims.dvp)?);
        Ok(Scratch {
            fq: zeroed(keys)?,
            fk: zeroed(keys)?,
            fkt: zeroed(keys)?,
            vx: zeroed(values)?,
            a: zeroed(CHUNK * CHUNK)?,
            o: zeroed(values)?,
            row: zeroed(dims.d.max(dims.dv))?,
        })
    }
}

/// Bytes of working memory each thread of a [`linear_attention`] call with head dimension `d`
/// and value dimension `dv` allocates (`None`: more than a 64-bit size holds); the call
/// itself refuses what it cannot allocate (`Error::Memory`), this is for a caller that must
/// refuse before it has made views of its arrays.
pub fn linear_scratch_bytes(d: usize, dv: usize) -> Option<usize> {
    let (keys, values) = (CHUNK.checked_mul(d)?, CHUNK.checked_mul(padded_values(dv)?)?);
    let floats = keys.checked_mul(3)?.checked_add(values.checked_mul(2)?)?.checked_add(CHUNK * CHUNK + d.max(dv))?;
    floats.checked_mul(4)
}

/// Linear attention of `q` over `k`/`v` into `out` (module docs). Shapes: `q (B, Hq, N, D)`,
/// `k (B, Hkv, M, D)`, `v (B, Hkv, M, Dv)`, `out (B, Hq, N, Dv)`; query head `h` uses KV head
/// `h / (Hq / Hkv)`. All four share one float dtype; arithmetic is f32.
///
/// With `state` (causal only) the sums start from it, and it is left holding the sums over
/// everything, so consecutive calls equal one call over the concatenated tokens.
pub fn linear_attention(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &mut StridedMut,
    state: Option<LinearState>,
    params: &LinearParams,
) -> Result<()> {
    linear_attention_isa(Isa::active(), q, k, v, out, state, params)
}

fn check(q: &Strided, k: &Strided, v: &Strided, out: &StridedMut, params: &LinearParams) -> Result<Dims> {
    if !(params.eps > 0.0 && params.eps.is_finite()) {
        return Err(Error::Value(format!("eps must be positive and finite, got {}", params.eps)));
    }
    check_qkv(q.shape(), k.shape(), v.shape())?;
    ensure_shape!(!(q.is_paged() || k.is_paged() || v.is_paged()), "linear attention does not read paged views");
    let [b, hq, n, d] = q.shape();
    let [_, hkv, m, _] = k.shape();
    let dv = v.shape()[3];
    ensure_shape!(out.shape() == [b, hq, n, dv], "out has shape {:?}, expected {:?}", out.shape(), [b, hq, n, dv]);
    ensure_shape!(
        !params.causal || n == m,
        "causal linear attention needs as many queries as keys: q {:?}, k {:?}",
        q.shape(),
        k.shape()
    );
    let dt = q.dtype();
    if dt == DType::I8 || k.dtype() != dt || v.dtype() != dt || out.dtype() != dt {
        return Err(Error::DType(format!(
            "q, k, v and out must share one float dtype, got {}, {}, {}, {}",
            dt.name(),
            k.dtype().name(),
            v.dtype().name(),
            out.dtype().name()
        )));
    }
    // Zero query heads fit zero KV heads too (`check_qkv`): there is nothing to compute.
    let group = hq.checked_div(hkv).unwrap_or(0);
    let too_large = |_| NoMemory { bytes: None }.named(LINEAR_MEMORY);
    let dvp = padded_values(dv).ok_or(NoMemory { bytes: None }).map_err(too_large)?;
    mul(d, dvp).map_err(too_large)?;
    Ok(Dims { hkv, group, n: m, d, dv, dvp })
}

/// [`linear_attention`] on a given ISA (which must be available).
fn linear_attention_isa(
    isa: Isa,
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &mut StridedMut,
    state: Option<LinearState>,
    params: &LinearParams,
) -> Result<()> {
    let dims = check(q, k, v, out, params)?;
    let units = product("k", &[("B", q.shape()[0]), ("Hkv", dims.hkv)])?;
    if let Some(st) = &state {
        ensure_shape!(params.causal, "a recurrent state needs causal=True");
        let (s_len, z_len) = (
            product("state", &[("B·Hkv", units), ("D", dims.d), ("Dv", dims.dv)])?,
            product("state", &[("B·Hkv", units), ("D", dims.d)])?,
        );
        ensure_shape!(
            st.s.len() == s_len && st.z.len() == z_len,
            "state has {} + {} entries, expected {s_len} + {z_len} for {units} (batch × kv head) units, D = {}, Dv = {}",
            st.s.len(),
            st.z.len(),
            dims.d,
            dims.dv
        );
    }
    if units == 0 || (params.causal && dims.n == 0) || q.shape()[2] == 0 && !params.causal {
        return Ok(());
    }
    let ctx = Ctx { q, k, v, out: out.rows(), params: *params, dims };
    run_units(isa, &ctx, units, state).map_err(|e| e.named(LINEAR_MEMORY))
}

/// A worker's scratch, or the allocation that failed making it.
fn worker(sc: &mut Alloc<Scratch>) -> Alloc<&mut Scratch> {
    sc.as_mut().map_err(|e| *e)
}

/// Runs a checked call over its `units` (batch × KV head) on `isa`, in segments where there
/// are fewer units than threads (module docs).
fn run_units(isa: Isa, ctx: &Ctx, units: usize, mut state: Option<LinearState>) -> Alloc<()> {
    let (dims, params, q) = (ctx.dims, &ctx.params, ctx.q);
    let len = dims.state_len();
    parallel::install(|| {
        // Segments per unit: one when the units alone keep every thread busy.
        let threads = rayon::current_num_threads();
        let chunks = dims.n.div_ceil(CHUNK).max(1);
        let want = if units >= threads { 1 } else { (4 * threads).div_ceil(units) };
        let per_seg = chunks.div_ceil(want.min(chunks)) * CHUNK;
        let segs = dims.n.div_ceil(per_seg).max(1);
        let range = |s: usize| ((s * per_seg).min(dims.n), ((s + 1) * per_seg).min(dims.n));
        let go = |job: Job, unit: usize, t0: usize, t1: usize, sc: &mut Scratch| {
            // SAFETY: `isa` is available (the caller's promise) and each job writes only its own
            // state buffer and the output rows of its own unit and tokens.
            unsafe { run(isa, ctx, job, unit, t0, t1, sc) }
        };
        let scratch = || Scratch::new(&dims);
        // buf[u][s]: a state of unit u, per segment.
        let mut buf = zeroed::<f32>(mul(mul(units, segs)?, len)?)?;
        if params.causal {
            // Segment s > 0 first holds the sums over segment s − 1; slot 0 the initial state.
            if let Some(st) = &state {
                buf.par_chunks_mut(segs * len).enumerate().for_each(|(u, b)| {
                    for dd in 0..dims.d {
                        let row = &mut b[dd * dims.dvp..(dd + 1) * dims.dvp];
                        row[..dims.dv].copy_from_slice(&st.s[(u * dims.d + dd) * dims.dv..][..dims.dv]);
                        row[dims.dv] = st.z[u * dims.d + dd];
                    }
                });
            }
            if segs > 1 {
                buf.par_chunks_mut(len).enumerate().filter(|(i, _)| i % segs != 0).try_for_each_init(
                    scratch,
                    |sc, (i, state)| {
                        let (t0, t1) = range(i % segs - 1);
                        go(Job::Delta { state }, i / segs, t0, t1, worker(sc)?);
                        Ok(())
                    },
                )?;
                buf.par_chunks_mut(segs * len).for_each(|b| {
                    for s in 1..segs {
                        let (prev, cur) = b[(s - 1) * len..(s + 1) * len].split_at_mut(len);
                        cur.iter_mut().zip(prev.iter()).for_each(|(c, p)| *c += p);
                    }
                });
            }
            buf.par_chunks_mut(len).enumerate().try_for_each_init(scratch, |sc, (i, state)| {
                let (t0, t1) = range(i % segs);
                go(Job::Scan { state }, i / segs, t0, t1, worker(sc)?);
                Ok(())
            })?;
        } else {
            buf.par_chunks_mut(len).enumerate().try_for_each_init(scratch, |sc, (i, state)| {
                let (t0, t1) = range(i % segs);
                go(Job::Delta { state }, i / segs, t0, t1, worker(sc)?);
                Ok(())
            })?;
            buf.par_chunks_mut(segs * len).for_each(|b| {
                let (total, rest) = b.split_at_mut(len);
                for part in rest.chunks(len) {
                    total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
                }
            });
            let nq = q.shape()[2];
            let blocks = nq.div_ceil(CHUNK);
            (0..mul(units, blocks)?).into_par_iter().try_for_each_init(scratch, |sc, i| {
                let (u, t0) = (i / blocks, (i % blocks) * CHUNK);
                let state = &buf[u * segs * len..][..len];
                go(Job::Rows { state }, u, t0, (t0 + CHUNK).min(nq), worker(sc)?);
                Ok(())
            })?;
        }
        // The last segment's state is the end state.
        if let Some(st) = &mut state {
            for u in 0..units {
                let b = &buf[(u * segs + segs - 1) * len..][..len];
                for dd in 0..dims.d {
                    let row = &b[dd * dims.dvp..(dd + 1) * dims.dvp];
                    st.s[(u * dims.d + dd) * dims.dv..][..dims.dv].copy_from_slice(&row[..dims.dv]);
                    st.z[u * dims.d + dd] = row[dims.dv];
                }
            }
        }
        Ok(())
    })
}

kernel_entry! {
    /// Runs one job (tokens `t0..t1` of `unit`) on the kernel of `isa`.
    ///
    /// # Safety
    /// `isa` must be available on this CPU, and no other job may write the output rows of
    /// `unit`, `t0..t1`.
    unsafe fn run(ctx: &Ctx, job: Job, unit: usize, t0: usize, t1: usize, sc: &mut Scratch) => body
}

/// # Safety
/// As for [`run`], with `S` available.
#[inline(always)]
unsafe fn body<S: Simd>(ctx: &Ctx, job: Job, unit: usize, t0: usize, t1: usize, sc: &mut Scratch) {
    let Dims { hkv, group, .. } = ctx.dims;
    let (b, kvh) = (unit / hkv, unit % hkv);
    let heads = kvh * group..(kvh + 1) * group;
    match job {
        Job::Delta { state } => {
            state.fill(0.0);
            for c0 in (t0..t1).step_by(CHUNK) {
                let l = (t1 - c0).min(CHUNK);
                let _ = load_keys::<S>(ctx, b, kvh, c0, l, sc, false);
                // SAFETY: extents as allocated in `Scratch::new`; `S` is available.
                unsafe { absorb::<S>(ctx, l, sc, state) };
            }
        }
        Job::Scan { state } => {
            for c0 in (t0..t1).step_by(CHUNK) {
                let l = (t1 - c0).min(CHUNK);
                let finite = load_keys::<S>(ctx, b, kvh, c0, l, sc, true);
                for h in heads.clone() {
                    // SAFETY: as for `Delta`; this job alone writes rows `t0..t1` of its unit's
                    // heads.
                    unsafe {
                        from_state::<S>(ctx, b, h, c0, l, sc, state);
                        within_chunk::<S>(ctx, l, finite, sc);
                        write_rows(ctx, b, h, c0, l, sc);
                    }
                }
                // SAFETY: as for `Delta`.
                unsafe { absorb::<S>(ctx, l, sc, state) };
            }
        }
        Job::Rows { state } => {
            for h in heads {
                // SAFETY: as in `Scan`.
                unsafe {
                    from_state::<S>(ctx, b, h, t0, t1 - t0, sc, state);
                    write_rows(ctx, b, h, t0, t1 - t0, sc);
                }
            }
        }
    }
}

/// φ of queries `c0..c0 + l` of head `h`, and their numerators and denominators against
/// `state` into `o` (`o = φ(Q)·[S|z]`).
///
/// # Safety
/// `l ≤ CHUNK`, `state` holds `d × dvp` floats, `S` is available.
#[inline(always)]
unsafe fn from_state<S: Simd>(ctx: &Ctx, b: usize, h: usize, c0: usize, l: usize, sc: &mut Scratch, state: &[f32]) {
    let Dims { d, dvp, .. } = ctx.dims;
    load_queries::<S>(ctx, b, h, c0, l, sc);
    // SAFETY: `fq` is `l × d` (ld d), `state` `d × dvp`, `o` `l × dvp`; `o` overlaps neither.
    unsafe {
        let (fq, s, o) =
            (A::rows(sc.fq.as_ptr(), d), B::new(state.as_ptr(), dvp as isize), C::new(sc.o.as_mut_ptr(), dvp));
        gemm::<S, f32>(fq, s, o, l, dvp, d, false);
    }
}

/// Adds the chunk's own keys to the numerators and denominators of its `l` queries (φ of both
/// in the scratch): `o += tril(φ(Q)φ(K)ᵀ)·[V|1]`. `finite`: whether every value is finite.
///
/// # Safety
/// `l ≤ CHUNK`, `S` is available.
#[inline(always)]
unsafe fn within_chunk<S: Simd>(ctx: &Ctx, l: usize, finite: bool, sc: &mut Scratch) {
    let Dims { d, dvp, .. } = ctx.dims;
    let n = round_up(l, S::LANES);
    let (vx, a) = (B::new(sc.vx.as_ptr(), dvp as isize), A::rows(sc.a.as_ptr(), CHUNK));
    // SAFETY: `fq` is `l × d` (ld d), `fkt` `d × CHUNK` with `n ≤ CHUNK` columns, `a` `l × CHUNK`;
    // `a` overlaps neither.
    unsafe {
        let (fq, fkt) = (A::rows(sc.fq.as_ptr(), d), B::new(sc.fkt.as_ptr(), CHUNK as isize));
        gemm::<S, f32>(fq, fkt, C::new(sc.a.as_mut_ptr(), CHUNK), l, n, d, false);
    }
    // Key j is visible to query i of the chunk when j ≤ i.
    for i in 0..l {
        sc.a[i * CHUNK + i + 1..i * CHUNK + l].fill(0.0);
    }
    if finite {
        // SAFETY: `a` has `l` columns used of ld CHUNK, `vx` is `l × dvp`, `o` `l × dvp`.
        unsafe { gemm::<S, f32>(a, vx, C::new(sc.o.as_mut_ptr(), dvp), l, dvp, l, true) };
    } else {
        // A masked weight of 0 times an infinite or NaN future value is NaN: let
        // each row read only the values it sees, so the future never leaks.
        for i in 0..l {
            // SAFETY: row `i` of `a` and `o`, the first `i + 1` rows of `vx`.
            unsafe {
                let (ai, oi) = (A::rows(sc.a[i * CHUNK..].as_ptr(), CHUNK), C::new(sc.o[i * dvp..].as_mut_ptr(), dvp));
                gemm::<S, f32>(ai, vx, oi, 1, dvp, i + 1, true);
            }
        }
    }
}

/// `state += φ(K)ᵀ·[V|1]` for the `l` keys in the scratch.
///
/// # Safety
/// `l ≤ CHUNK`, `state` holds `d × dvp` floats, `S` is available.
#[inline(always)]
unsafe fn absorb<S: Simd>(ctx: &Ctx, l: usize, sc: &Scratch, state: &mut [f32]) {
    let Dims { d, dvp, .. } = ctx.dims;
    debug_assert!(l <= CHUNK && state.len() == d * dvp);
    // SAFETY: `fk` is `l × d` row-major, read transposed (element (dd, j) at j·d + dd); `vx` is
    // `l × dvp`; `state` is `d × dvp` and overlaps neither.
    unsafe {
        let (fkt, vx) = (A::transposed(sc.fk.as_ptr(), d), B::new(sc.vx.as_ptr(), dvp as isize));
        gemm::<S, f32>(fkt, vx, C::new(state.as_mut_ptr(), dvp), d, dvp, l, true)
    }
}

/// φ of keys `c0..c0 + l` (row-major, and transposed when `transposed`) and their values with a
/// trailing 1. Returns whether every value is finite.
#[inline(always)]
fn load_keys<S: Simd>(
    ctx: &Ctx,
    b: usize,
    kvh: usize,
    c0: usize,
    l: usize,
    sc: &mut Scratch,
    transposed: bool,
) -> bool {
    let Dims { d, dv, dvp, .. } = ctx.dims;
    let mut finite = true;
    for j in 0..l {
        let fk = &mut sc.fk[j * d..(j + 1) * d];
        ctx.k.read_row(b, kvh, c0 + j, fk, 1.0);
        ctx.params.feature_map.apply::<S>(fk);
        if transposed {
            for (dd, &x) in fk.iter().enumerate() {
                sc.fkt[dd * CHUNK + j] = x;
            }
        }
        let vx = &mut sc.vx[j * dvp..(j + 1) * dvp];
        ctx.v.read_row(b, kvh, c0 + j, vx, 1.0);
        finite &= vx[..dv].iter().all(|x| x.is_finite());
        vx[dv] = 1.0;
    }
    finite
}

/// φ of queries `c0..c0 + l` of head `h`, row-major.
#[inline(always)]
fn load_queries<S: Simd>(ctx: &Ctx, b: usize, h: usize, c0: usize, l: usize, sc: &mut Scratch) {
    let d = ctx.dims.d;
    for i in 0..l {
        let fq = &mut sc.fq[i * d..(i + 1) * d];
        ctx.q.read_row(b, h, c0 + i, fq, 1.0);
        ctx.params.feature_map.apply::<S>(fq);
    }
}

/// Divides each numerator row of `o` by its denominator (+ eps) and writes it out.
///
/// # Safety
/// No other thread may write rows `c0..c0 + l` of head `h` concurrently.
#[inline(always)]
unsafe fn write_rows(ctx: &Ctx, b: usize, h: usize, c0: usize, l: usize, sc: &mut Scratch) {
    let Dims { dv, dvp, .. } = ctx.dims;
    for i in 0..l {
        let o = &sc.o[i * dvp..i * dvp + dv + 1];
        let inv = 1.0 / (o[dv] + ctx.params.eps);
        for (r, &x) in sc.row[..dv].iter_mut().zip(o) {
            *r = x * inv;
        }
        // SAFETY: forwarded from the caller.
        unsafe { ctx.out.write_row(b, h, c0 + i, &sc.row[..dv]) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Elems, ElemsMut};

    fn phi(fm: FeatureMap, x: f64) -> f64 {
        match fm {
            FeatureMap::Elu1 => {
                if x > 0.0 {
                    x + 1.0
                } else {
                    x.exp()
                }
            }
            FeatureMap::Relu => x.max(0.0),
        }
    }

    /// The quadratic form in f64: `A = φ(Q)φ(K)ᵀ` (masked), `out = A·V / (rowsum(A) + eps)`.
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], shape: [usize; 6], causal: bool, fm: FeatureMap, eps: f64) -> Vec<f64> {
        let [b, hq, hkv, n, d, dv] = shape;
        let g = hq / hkv;
        let mut out = vec![0.0; b * hq * n * dv];
        for bb in 0..b {
            for h in 0..hq {
                let kh = bb * hkv + h / g;
                for i in 0..n {
                    let (mut num, mut den) = (vec![0.0; dv], 0.0);
                    for j in 0..if causal { i + 1 } else { n } {
                        let a: f64 = (0..d)
                            .map(|x| {
                                phi(fm, q[((bb * hq + h) * n + i) * d + x] as f64)
                                    * phi(fm, k[(kh * n + j) * d + x] as f64)
                            })
                            .sum();
                        den += a;
                        for (y, o) in num.iter_mut().enumerate() {
                            *o += a * v[(kh * n + j) * dv + y] as f64;
                        }
                    }
                    for y in 0..dv {
                        out[((bb * hq + h) * n + i) * dv + y] = num[y] / (den + eps);
                    }
                }
            }
        }
        out
    }

    fn data(len: usize, seed: f32) -> Vec<f32> {
        (0..len).map(|i| ((i as f32 + seed) * 0.731).sin() * 1.5).collect()
    }

    #[test]
    fn matches_naive_on_every_isa() {
        for isa in Isa::available() {
            for &[b, hq, hkv, n, d, dv] in &[[1, 1, 1, 1, 1, 1], [2, 4, 2, 70, 13, 9], [1, 2, 1, 200, 24, 33]] {
                for causal in [false, true] {
                    for fm in [FeatureMap::Elu1, FeatureMap::Relu] {
                        let (q, k, v) =
                            (data(b * hq * n * d, 0.0), data(b * hkv * n * d, 1.0), data(b * hkv * n * dv, 2.0));
                        let qv = Strided::contiguous("q", Elems::F32(&q), [b, hq, n, d]).unwrap();
                        let kv = Strided::contiguous("k", Elems::F32(&k), [b, hkv, n, d]).unwrap();
                        let vv = Strided::contiguous("v", Elems::F32(&v), [b, hkv, n, dv]).unwrap();
                        let mut y = vec![0f32; b * hq * n * dv];
                        let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut y), [b, hq, n, dv]).unwrap();
                        let params = LinearParams::new(causal, fm);
                        linear_attention_isa(isa, &qv, &kv, &vv, &mut ov, None, &params).unwrap();
                        let want = naive(&q, &k, &v, [b, hq, hkv, n, d, dv], causal, fm, 1e-6);
                        let err: f64 = y.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
                        let norm: f64 = want.iter().map(|x| x * x).sum::<f64>().sqrt();
                        assert!(
                            err <= 1e-5 * norm.max(1e-30),
                            "{isa:?} {:?} causal={causal} {fm:?}: {err} vs {norm}",
                            [b, hq, hkv, n, d, dv]
                        );
                    }
                }
            }
        }
    }

    /// Tokens `t0..t0 + t` of a contiguous `(1, 2, 150, w)` buffer.
    fn view(x: &[f32], w: usize, t0: usize, t: usize) -> Strided<'_> {
        let strides = [(2 * 150 * w) as isize, (150 * w) as isize, w as isize, 1];
        Strided::new("x", Elems::F32(x), t0 * w, [1, 2, t, w], strides).unwrap()
    }

    #[test]
    fn state_carries_over_calls() {
        let (hkv, n, d, dv) = (2, 150, 10, 7);
        let (q, k, v) = (data(hkv * n * d, 3.0), data(hkv * n * d, 4.0), data(hkv * n * dv, 5.0));
        let params = LinearParams::new(true, FeatureMap::Elu1);
        let mut whole = vec![0f32; hkv * n * dv];
        {
            let qv = Strided::contiguous("q", Elems::F32(&q), [1, hkv, n, d]).unwrap();
            let kv = Strided::contiguous("k", Elems::F32(&k), [1, hkv, n, d]).unwrap();
            let vv = Strided::contiguous("v", Elems::F32(&v), [1, hkv, n, dv]).unwrap();
            let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut whole), [1, hkv, n, dv]).unwrap();
            linear_attention(&qv, &kv, &vv, &mut ov, None, &params).unwrap();
        }
        let (mut s, mut z) = (vec![0f32; hkv * d * dv], vec![0f32; hkv * d]);
        let mut parts = vec![0f32; hkv * n * dv];
        for (t0, t1) in [(0, 1), (1, 90), (90, 91), (91, 150)] {
            let t = t1 - t0;
            let (qv, kv, vv) = (view(&q, d, t0, t), view(&k, d, t0, t), view(&v, dv, t0, t));
            let strides = [(hkv * n * dv) as isize, (n * dv) as isize, dv as isize, 1];
            let mut ov = StridedMut::new("out", ElemsMut::F32(&mut parts), t0 * dv, [1, hkv, t, dv], strides).unwrap();
            let st = LinearState { s: &mut s, z: &mut z };
            linear_attention(&qv, &kv, &vv, &mut ov, Some(st), &params).unwrap();
        }
        for (a, b) in whole.iter().zip(&parts) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
