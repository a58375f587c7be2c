//! The prefill kernel: one task = a tile of query rows against every key tile they can see,
//! with an online softmax (running max `m`, running sum `l`) so the score matrix never exists
//! beyond one `keys × rows` tile.
//!
//! Scores are kept transposed (`Sᵀ = K·Qᵀ`, one key per row, one query per column): K is then
//! read row by row, in place for f32 input, Qᵀ is packed once per task instead of K once per
//! tile, and the softmax reductions over keys become plain vector max/add down the rows.

use super::gemm::gemm;
use super::{Ctx, Plan, Sinks, Task};
use crate::extras::{RowAt, TileFacts};
use crate::layout::TypedRows;
use crate::mask::{position, visible, Vis};
use crate::simd::{elem::Elem, row_ptrs, scalar::Scalar, Isa, Prefetch, Simd};

/// Widest `2·LANES` of any ISA: padding to it fits every path.
const MAX_NR: usize = 32;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Per-worker buffers, reused across tasks.
pub(crate) struct Scratch {
    /// Scaled queries, transposed: `d × rows_p`.
    pub qt: Vec<f32>,
    /// The same, row-major (`rows × d`), for the few-rows (decode) score path.
    pub q: Vec<f32>,
    /// Key tile converted to f32 (when it cannot be read in place): `bc × d`. Empty until
    /// [`tile_buffer`] first needs it: decode steps, and calls with f32 K and V, read tiles in
    /// place, and zeroing 2 × 64 KiB per worker per call showed in short calls.
    pub k: Vec<f32>,
    /// Value tile converted and padded: `bc × dvp`; made on first use, as `k`.
    pub v: Vec<f32>,
    /// Scores, then probabilities, transposed: `bc × rows_p`.
    pub st: Vec<f32>,
    /// Unnormalized output: `rows_p × dvp`.
    pub acc: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// Per tile: the row max (then the max to subtract), the row sum, the rescale factor.
    pub tmax: Vec<f32>,
    pub tsum: Vec<f32>,
    pub alpha: Vec<f32>,
    /// Visible keys of each row, relative to the sequence.
    pub vis: Vec<Vis>,
    /// Where each row sits, for biases and masks.
    pub at: Vec<RowAt>,
    /// Whether the last score tile hid any key from a row (so a NaN value there must not
    /// reach every row).
    pub tile_masked: bool,
    /// One converted input row.
    pub row: Vec<f32>,
    /// The int8 scales of one key tile, gathered.
    pub keyscale: Vec<f32>,
    /// Queries rounded to 16 bits (`rows × d`) and their per-row scales, for int8 keys.
    pub q16: Vec<i16>,
    pub qscale: Vec<f32>,
    /// Whether `q16` holds this task's queries: `None` until first asked for, then whether
    /// they could be rounded (finite).
    pub q16_ready: Option<bool>,
    /// Probabilities of up to 8 rows rounded to 16 bits, two keys per word, for int8 values
    /// (a key tile rounded up to whole vectors per row).
    pub pairs: Vec<i32>,
    /// What the dense mask and bias hold, per key tile and row, over the current key range.
    pub facts: TileFacts,
}

impl Scratch {
    pub(crate) fn new(plan: &Plan) -> Scratch {
        let rows_p = round_up(plan.group * plan.tq, MAX_NR);
        let dvp = round_up(plan.dv, MAX_NR);
        Scratch {
            qt: vec![0.0; plan.d * rows_p],
            q: vec![0.0; plan.d * rows_p],
            k: Vec::new(),
            v: Vec::new(),
            st: vec![0.0; plan.bc * rows_p],
            acc: vec![0.0; rows_p * dvp],
            m: vec![0.0; rows_p],
            l: vec![0.0; rows_p],
            tmax: vec![0.0; rows_p],
            tsum: vec![0.0; rows_p],
            alpha: vec![0.0; rows_p],
            vis: vec![Vis::default(); rows_p],
            at: vec![RowAt { batch: 0, head: 0, qi: 0, pos: 0, k_start: 0 }; rows_p],
            tile_masked: false,
            row: vec![0.0; plan.d.max(plan.dv)],
            keyscale: vec![0.0; plan.bc],
            q16: vec![0; plan.d * rows_p],
            qscale: vec![0.0; rows_p],
            q16_ready: None,
            pairs: vec![0; 8 * plan.bc.div_ceil(32) * 16],
            facts: TileFacts::default(),
        }
    }
}

/// `buf`, made `len` zeros on first use (padding columns are never written, so stay zero).
fn tile_buffer(buf: &mut Vec<f32>, len: usize) -> *mut f32 {
    if buf.len() < len {
        *buf = vec![0.0; len];
    }
    buf.as_mut_ptr()
}

/// Padded sizes for one ISA.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub rows: usize,
    /// Score columns the softmax handles: `rows` rounded up to LANES (≤ `rows_p`).
    pub cols: usize,
    pub rows_p: usize,
    pub dvp: usize,
}

/// What a task produces: its output rows, or the partial state of one slice of its keys.
pub(crate) enum Job<'a> {
    Rows(&'a Sinks<'a>),
    /// Keys `k0..k1` only; `buf` receives the state laid out as [`super::softmax`] expects.
    Partial {
        buf: &'a mut [f32],
        k0: usize,
        k1: usize,
    },
}

/// Runs one task on the kernel of `isa`.
///
/// # Safety
/// `isa` must be available on this CPU, and no other task may write the rows of `task`.
pub(crate) unsafe fn run(isa: Isa, ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) {
    // SAFETY: forwarded from the caller; each entry point needs only its ISA.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_avx512(ctx, job, task, sc),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_avx2(ctx, job, task, sc),
            _ => task_body::<Scalar>(ctx, job, task, sc),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) {
    // SAFETY: the caller checked the ISA and owns the task's rows.
    unsafe { task_body::<crate::simd::x86::Avx2>(ctx, job, task, sc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512(ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) {
    // SAFETY: the caller checked the ISA and owns the task's rows.
    unsafe { task_body::<crate::simd::x86::Avx512>(ctx, job, task, sc) }
}

/// Row `r` of a task is query `i0 + r % tq` of head `kvh·group + r / tq`.
#[inline(always)]
pub(crate) fn row_of(plan: &Plan, task: &Task, r: usize) -> (usize, usize) {
    let tq = task.i1 - task.i0;
    (task.kvh * plan.group + r / tq, task.i0 + r % tq)
}

/// Scores are kept in base 2 (`log2 e` folded into the scale) so the softmax needs `2^x` only;
/// a softcap needs natural units for its tanh and converts after it.
#[inline(always)]
fn query_mul(ctx: &Ctx) -> f32 {
    match ctx.params.softcap {
        Some(_) => ctx.params.scale,
        None => ctx.params.scale * std::f32::consts::LOG2_E,
    }
}

/// Packs the task's scaled queries transposed and their visible ranges; resets the softmax
/// state. Returns the padded sizes.
#[inline(always)]
pub(crate) fn load_queries<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch) -> Dims {
    let plan = &ctx.plan;
    let nr = 2 * S::LANES;
    let rows = plan.group * (task.i1 - task.i0);
    let dims = Dims { rows, cols: round_up(rows, S::LANES), rows_p: round_up(rows, nr), dvp: round_up(plan.dv, nr) };
    let seq = &ctx.seqs[task.seq];
    let (d, rows_p) = (plan.d, dims.rows_p);
    for r in 0..rows_p {
        if r < rows {
            let (h, i) = row_of(plan, task, r);
            ctx.q.read_row(seq.batch, h, seq.q_start + i, &mut sc.row, query_mul(ctx));
            for (dd, &x) in sc.row[..d].iter().enumerate() {
                sc.qt[dd * rows_p + r] = x;
            }
            sc.q[r * d..(r + 1) * d].copy_from_slice(&sc.row[..d]);
            sc.vis[r] = visible(ctx.params, seq, i);
            sc.at[r] = RowAt {
                batch: seq.batch,
                head: h,
                qi: seq.q_start + i,
                pos: position(ctx.params, seq, i),
                k_start: seq.k_start,
            };
        } else {
            sc.vis[r] = Vis::default();
        }
    }
    // Padding columns of Qᵀ are zero, so the score gemm's padding lanes stay finite; written
    // row by row (contiguous), not column by column.
    if rows < rows_p {
        for dd in 0..d {
            sc.qt[dd * rows_p + rows..(dd + 1) * rows_p].fill(0.0);
        }
    }
    sc.m[..rows_p].fill(f32::NEG_INFINITY);
    sc.l[..rows_p].fill(0.0);
    sc.q16_ready = None;
    dims
}

/// `Sᵀ[j, r] = K[j]·Q[r]` for the first `R` rows, vectorized along D, `KB` keys at a time so
/// `R·KB` independent accumulators hide the FMA latency.
///
/// # Safety
/// `k` holds `kn` rows of `d` floats `ldk` apart, `q` holds `R` rows of `d`, `st` holds
/// `kn × ld_st` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_kb<S: Simd, E: Elem, const R: usize, const KB: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    j0: usize,
    pf: Prefetch,
) {
    let l = S::LANES;
    let body = d - d % l;
    // SAFETY: indices stay inside the extents the caller vouched for.
    unsafe {
        let kr = row_ptrs::<E, KB>(k, ldk, j0);
        // Keys are streamed once: ask for the rows a few steps ahead, and for the companion rows
        // (values of the same keys) the caller names.
        Prefetch::of(k, ldk, d).rows(j0 + 8, KB);
        pf.rows(j0, KB);
        let mut acc = [[S::zero(); R]; KB];
        for c in (0..body).step_by(l) {
            // Plain loops, not `array::from_fn` (see `gemm`).
            let mut kv = [S::zero(); KB];
            for (x, p) in kv.iter_mut().zip(&kr) {
                *x = E::load::<S>(p.add(c));
            }
            for r in 0..R {
                let qv = S::load(q.add(r * d + c));
                for (a, &k) in acc.iter_mut().zip(&kv) {
                    a[r] = S::fma(qv, k, a[r]);
                }
            }
        }
        for (t, (a, &kt)) in acc.iter().zip(&kr).enumerate() {
            for (r, &ar) in a.iter().enumerate() {
                let mut x = S::reduce_sum(ar);
                for c in body..d {
                    x += *q.add(r * d + c) * (*kt.add(c)).to_f32();
                }
                *st.add((j0 + t) * ld_st + r) = x;
            }
        }
    }
}

/// [`dots_kb`] over keys `0..kn`.
///
/// # Safety
/// As for [`dots_kb`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots<S: Simd, E: Elem, const R: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    kn: usize,
    pf: Prefetch,
) {
    // Keep R·KB accumulators within the 16 registers of AVX2 alongside the loads.
    const { assert!(R <= 4) };
    let mut j = 0;
    // SAFETY: forwarded; every call covers keys inside 0..kn.
    unsafe {
        if R <= 2 {
            while j + 4 <= kn {
                dots_kb::<S, E, R, 4>(k, ldk, q, d, st, ld_st, j, pf);
                j += 4;
            }
        } else {
            while j + 2 <= kn {
                dots_kb::<S, E, R, 2>(k, ldk, q, d, st, ld_st, j, pf);
                j += 2;
            }
        }
        while j < kn {
            dots_kb::<S, E, R, 1>(k, ldk, q, d, st, ld_st, j, pf);
            j += 1;
        }
    }
}

/// [`dots`] for rows `from..to`, one at a time.
///
/// # Safety
/// As for [`dots`], with `to` rows in `q`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_from<S: Simd, E: Elem>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld_st: usize,
    kn: usize,
    from: usize,
    to: usize,
    pf: Prefetch,
) {
    for r in from..to {
        // SAFETY: row r of q and column r of st are in range.
        unsafe { dots::<S, E, 1>(k, ldk, q.add(r * d), d, st.add(r), ld_st, kn, pf) };
    }
}

/// `Sᵀ` of keys `k0..k0 + kn` against the task's rows into `sc.st`: softcapped, and −∞ where a
/// row may not look.
#[inline(always)]
pub(crate) unsafe fn score_tile<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch, dims: &Dims, k0: usize, kn: usize) {
    let plan = &ctx.plan;
    let seq = &ctx.seqs[task.seq];
    let (d, rows_p) = (plan.d, dims.rows_p);
    let first = seq.k_start + k0;
    let (a, lda) = match ctx.k.f32_rows(seq.batch, task.kvh, first) {
        Some(direct) => direct,
        None => {
            let buf = tile_buffer(&mut sc.k, plan.bc * d);
            // SAFETY: the buffer holds bc × d floats; the rows come from the validated view.
            unsafe { widen_rows::<S>(ctx.k.typed_rows(seq.batch, task.kvh, first), kn, d, buf, d) };
            (sc.k.as_ptr(), d as isize)
        }
    };
    // SAFETY: A is kn rows of d floats (in place: rows of the validated view), Qᵀ is d × rows_p,
    // Q rows × d, Sᵀ is bc × rows_p; rows_p is a multiple of 2·LANES.
    unsafe {
        if !scores_few::<S, f32>(a, lda, sc, dims, d, kn, Prefetch::NONE) {
            gemm::<S, f32>(
                a,
                lda,
                1,
                sc.qt.as_ptr(),
                rows_p as isize,
                sc.st.as_mut_ptr(),
                rows_p,
                kn,
                rows_p,
                d,
                false,
            );
        }
    }
    mask_tile(ctx, sc, dims, k0, kn);
}

/// Few rows (decode): padding them to 2·LANES score columns would waste most of the products,
/// so take dot products along D instead. Returns false when there are too many rows for that.
///
/// # Safety
/// `k` holds `kn` rows of `d` elements `ldk` apart; the scratch is sized for the plan.
#[inline(always)]
pub(crate) unsafe fn scores_few<S: Simd, E: Elem>(
    k: *const E,
    ldk: isize,
    sc: &mut Scratch,
    dims: &Dims,
    d: usize,
    kn: usize,
    pf: Prefetch,
) -> bool {
    let (q, st, rows_p) = (sc.q.as_ptr(), sc.st.as_mut_ptr(), dims.rows_p);
    // SAFETY: forwarded; Q holds `rows` rows of d, Sᵀ kn × rows_p.
    unsafe {
        match dims.rows {
            1 => dots::<S, E, 1>(k, ldk, q, d, st, rows_p, kn, pf),
            2 => dots::<S, E, 2>(k, ldk, q, d, st, rows_p, kn, pf),
            3 => dots::<S, E, 3>(k, ldk, q, d, st, rows_p, kn, pf),
            4 => dots::<S, E, 4>(k, ldk, q, d, st, rows_p, kn, pf),
            5..=8 if dims.rows * 2 <= rows_p => {
                dots::<S, E, 4>(k, ldk, q, d, st, rows_p, kn, pf);
                dots_from::<S, E>(k, ldk, q, d, st, rows_p, kn, 4, dims.rows, Prefetch::NONE);
            }
            _ => return false,
        }
    }
    true
}

/// Softcap, then −∞ where a row may not look.
#[inline(always)]
pub(crate) fn mask_tile(ctx: &Ctx, sc: &mut Scratch, dims: &Dims, k0: usize, kn: usize) {
    let rows_p = dims.rows_p;
    let st = &mut sc.st[..kn * rows_p];
    if let Some(c) = ctx.params.softcap {
        let (inv, mul) = (1.0 / c, c * std::f32::consts::LOG2_E);
        st.iter_mut().for_each(|x| *x = mul * (*x * inv).tanh());
    }
    // Padding columns are left as they are: softmax lanes are columns, so whatever they hold
    // stays in their own lanes, and P·V reads real rows only.
    let mut masked = false;
    for r in 0..dims.rows {
        let vis = sc.vis[r];
        if vis.sees_all(k0, k0 + kn) {
            continue;
        }
        masked = true;
        for j in 0..kn {
            if !vis.sees(k0 + j) {
                st[j * rows_p + r] = f32::NEG_INFINITY;
            }
        }
    }
    let facts = sc.facts.tile(k0);
    masked |= ctx.extras.apply(&sc.at[..dims.rows], k0, kn, st, rows_p, std::f32::consts::LOG2_E, facts);
    sc.tile_masked = masked;
}

/// Folds the (base-2) score tile into the running max and sum of every row: turns `Sᵀ` into
/// probabilities relative to the new max and leaves each row's rescale factor in `sc.alpha`.
#[inline(always)]
pub(crate) unsafe fn softmax_update<S: Simd>(sc: &mut Scratch, dims: &Dims, kn: usize) {
    let (l, rows_p) = (S::LANES, dims.rows_p);
    let st = sc.st.as_mut_ptr();
    // SAFETY: st holds kn × rows_p floats and the per-row arrays rows_p, with rows_p a
    // multiple of LANES.
    unsafe {
        for c in (0..dims.cols).step_by(l) {
            let mut mx = S::splat(f32::NEG_INFINITY);
            for j in 0..kn {
                mx = S::max(mx, S::load(st.add(j * rows_p + c)));
            }
            S::store(sc.tmax.as_mut_ptr().add(c), mx);
        }
        for r in 0..dims.cols {
            let (m_old, t) = (sc.m[r], sc.tmax[r]);
            let m_new = if m_old > t { m_old } else { t };
            sc.alpha[r] = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp2() };
            sc.m[r] = m_new;
            // A row that has seen nothing yet subtracts 0, so 2^(−∞ − 0) = 0, not NaN.
            sc.tmax[r] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
        }
        for c in (0..dims.cols).step_by(l) {
            let mv = S::load(sc.tmax.as_ptr().add(c));
            let mut sum = S::zero();
            for j in 0..kn {
                let p = S::exp2(S::sub(S::load(st.add(j * rows_p + c)), mv));
                S::store(st.add(j * rows_p + c), p);
                sum = S::add(sum, p);
            }
            S::store(sc.tsum.as_mut_ptr().add(c), sum);
        }
        for r in 0..dims.cols {
            sc.l[r] = sc.l[r] * sc.alpha[r] + sc.tsum[r];
        }
    }
}

/// Whether no element is NaN or ±∞; an integer max over the exponent bits, which vectorizes
/// (a float test with early exit does not).
#[inline(always)]
fn all_finite(xs: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    xs.iter().fold(0u32, |m, x| m.max(x.to_bits() & EXP)) != EXP
}

#[inline(always)]
unsafe fn task_body<S: Simd>(ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) {
    let dims = load_queries::<S>(ctx, task, sc);
    sc.acc[..dims.rows_p * dims.dvp].fill(0.0);
    let (j0, j1) = match job {
        Job::Rows(_) => (0, usize::MAX),
        Job::Partial { k0, k1, .. } => (k0, k1),
    };
    for (lo, hi) in ctx.key_ranges(task) {
        let (lo, hi) = (lo.max(j0), hi.min(j1));
        if lo < hi {
            // SAFETY: buffers sized by Scratch::new for this plan.
            unsafe { accumulate::<S>(ctx, task, sc, &dims, lo, hi) };
        }
    }
    match job {
        Job::Rows(sinks) => write_rows(ctx, sinks, task, sc, &dims),
        Job::Partial { buf, .. } => super::softmax::save_partial(buf, dims.rows, ctx.plan.dv, dims.dvp, sc),
    }
}

/// Converts `n` rows of `d` elements to f32 rows `ld` apart at `dst`, widening in registers
/// (F16C, shifts, byte widening): tiles of half-precision or int8 inputs are converted once
/// per task and tile, so this runs in the hot loop.
///
/// # Safety
/// `rows` holds `n` readable rows of `d` elements; `dst` holds `n` rows of `ld ≥ d` floats.
#[inline(always)]
pub(crate) unsafe fn widen_rows<S: Simd>(rows: TypedRows, n: usize, d: usize, dst: *mut f32, ld: usize) {
    // SAFETY: forwarded.
    unsafe {
        match rows {
            TypedRows::F32(p, lds) => widen::<S, f32>(p, lds, None, n, d, dst, ld),
            TypedRows::F16(p, lds) => widen::<S, half::f16>(p, lds, None, n, d, dst, ld),
            TypedRows::BF16(p, lds) => widen::<S, half::bf16>(p, lds, None, n, d, dst, ld),
            TypedRows::I8(p, lds, s, sld) => widen::<S, i8>(p, lds, Some((s, sld)), n, d, dst, ld),
            TypedRows::Unreadable => unreachable!("attention checked that the view is readable"),
        }
    }
}

/// See [`widen_rows`]; `scales` multiplies row `j` by `scales[j · stride]`.
///
/// # Safety
/// As for [`widen_rows`].
#[inline(always)]
unsafe fn widen<S: Simd, E: Elem>(
    src: *const E,
    lds: isize,
    scales: Option<(*const f32, isize)>,
    n: usize,
    d: usize,
    dst: *mut f32,
    ld: usize,
) {
    let l = S::LANES;
    let body = d - d % l;
    // SAFETY: indices stay inside the extents the caller vouched for.
    unsafe {
        for j in 0..n {
            let (row, out) = (src.offset(j as isize * lds), dst.add(j * ld));
            let s = scales.map_or(1.0, |(p, st)| *p.offset(j as isize * st));
            let sv = S::splat(s);
            for c in (0..body).step_by(l) {
                S::store(out.add(c), S::fma(E::load::<S>(row.add(c)), sv, S::zero()));
            }
            for c in body..d {
                *out.add(c) = (*row.add(c)).to_f32() * s;
            }
        }
    }
}

/// Multiplies each row's accumulator by its softmax rescale factor.
#[inline(always)]
pub(crate) fn rescale_acc(sc: &mut Scratch, dims: &Dims) {
    let dvp = dims.dvp;
    for r in 0..dims.rows {
        let a = sc.alpha[r];
        if a != 1.0 {
            sc.acc[r * dvp..(r + 1) * dvp].iter_mut().for_each(|x| *x *= a);
        }
    }
}

/// Runs the online softmax of the task's rows over keys `kmin..kmax`.
#[inline(always)]
unsafe fn accumulate<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch, dims: &Dims, kmin: usize, kmax: usize) {
    let plan = ctx.plan;
    let (rows_p, dvp, dv) = (dims.rows_p, dims.dvp, plan.dv);
    let seq = &ctx.seqs[task.seq];
    let v_view = ctx.v.expect("attention has values");
    ctx.extras.scan(&sc.at[..dims.rows], kmin, kmax, plan.bc, &mut sc.facts);
    let step = super::decode::keys_per_step::<S>(ctx, sc, dims, kmin, kmax);
    let mut k0 = kmin;
    while k0 < kmax {
        let kn = plan.bc.min(kmax - k0);
        let first = seq.k_start + k0;
        if ctx.extras.masks() && !ctx.extras.tile_live(&sc.at[..dims.rows], k0, kn, sc.facts.tile(k0)) {
            k0 += kn;
            continue;
        }
        let wide = step.min(kmax - k0);
        // SAFETY: buffers sized by Scratch::new for this plan.
        if unsafe { super::decode::tile::<S>(ctx, task, sc, dims, k0, wide) } {
            k0 += wide;
            continue;
        }
        // SAFETY: as above.
        unsafe {
            score_tile::<S>(ctx, task, sc, dims, k0, kn);
            softmax_update::<S>(sc, dims, kn);
        }
        rescale_acc(sc, dims);
        // When every row sees every key of the tile, a NaN value is read by all of them anyway;
        // only a partly masked tile needs the (costly) check below.
        let all_visible = !sc.tile_masked;
        // Half-precision and int8 values go straight into P·V, widened in registers.
        if all_visible && dv == dvp {
            // SAFETY: V rows k0..k0 + kn of a validated view; scratch sized by the plan.
            if unsafe { super::decode::pv_narrow::<S>(sc, dims, v_view, seq, task.kvh, first, kn) } {
                k0 += kn;
                continue;
            }
        }
        let in_place = if dv == dvp { v_view.f32_rows(seq.batch, task.kvh, first) } else { None };
        let (b, ldb) = match in_place {
            Some(direct) => direct,
            None => {
                let buf = tile_buffer(&mut sc.v, plan.bc * dvp);
                // SAFETY: the buffer holds bc × dvp floats; the rows come from the validated view.
                unsafe { widen_rows::<S>(v_view.typed_rows(seq.batch, task.kvh, first), kn, dv, buf, dvp) };
                (sc.v.as_ptr(), dvp as isize)
            }
        };
        let v_finite = all_visible
            || (0..kn).all(|j| {
                // SAFETY: B holds kn rows of at least dv floats `ldb` apart.
                all_finite(unsafe { std::slice::from_raw_parts(b.offset(j as isize * ldb), dv) })
            });
        if v_finite {
            // SAFETY: Pᵀ is kn × rows_p (read as P: row stride 1, column stride rows_p), B is
            // kn × dvp, acc rows × dvp with dvp a multiple of 2·LANES; only real rows are
            // multiplied.
            unsafe {
                gemm::<S, f32>(
                    sc.st.as_ptr(),
                    1,
                    rows_p as isize,
                    b,
                    ldb,
                    sc.acc.as_mut_ptr(),
                    dvp,
                    dims.rows,
                    dvp,
                    kn,
                    true,
                )
            };
        } else {
            // A NaN or ∞ in a value row must reach only the queries that see it:
            // 0·NaN would leak into every row, so skip the zero probabilities.
            for j in 0..kn {
                // SAFETY: as above.
                let vrow = unsafe { std::slice::from_raw_parts(b.offset(j as isize * ldb), dv) };
                for r in 0..dims.rows {
                    let p = sc.st[j * rows_p + r];
                    if p != 0.0 {
                        for (o, &x) in sc.acc[r * dvp..r * dvp + dv].iter_mut().zip(vrow) {
                            *o += p * x;
                        }
                    }
                }
            }
        }
        k0 += kn;
    }
}

/// Normalizes the task's rows and writes them (and their LSE) to the sinks.
fn write_rows(ctx: &Ctx, sinks: &Sinks, task: &Task, sc: &mut Scratch, dims: &Dims) {
    let (dv, dvp) = (ctx.plan.dv, dims.dvp);
    let seq = &ctx.seqs[task.seq];
    for r in 0..dims.rows {
        let (h, i) = row_of(&ctx.plan, task, r);
        let sink = ctx.extras.sink(h);
        let lse = super::softmax::finish_row(&sc.acc[r * dvp..r * dvp + dv], sc.m[r], sc.l[r], &mut sc.row[..dv], sink);
        // SAFETY: this task is the only writer of its rows.
        unsafe { sinks.write(seq, h, seq.q_start + i, &sc.row[..dv], lse) };
    }
}
