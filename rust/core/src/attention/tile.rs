//! What every attention kernel works with: the plan of a call and its tasks, each worker's
//! buffers, and the steps on one tile of keys that the kernels share — packing a task's
//! queries, the score tile (dot products or the gemm), masking it, widening rows of f16, bf16
//! or int8 to f32, and P·V with values read in place.
//!
//! A task is one sequence × one KV head × a tile of queries, holding the rows of *all* query
//! heads that share the KV head (GQA/MQA), so each K/V tile is read once for the whole group.
//! Scores are kept transposed (`Sᵀ = K·Qᵀ`, one key per row, one query per column): K is then
//! read row by row, in place for f32 input, Qᵀ is packed once per task instead of K once per
//! tile, and the softmax reductions over keys become plain vector max/add down the rows. The
//! few-rows path keeps its scores row-major in the same buffer (see `decode`).

use super::dots::{dots, dots_from};
use super::online::Online;
use crate::gemm::{gemm, stream_rows, A, B, C};
use crate::layout::{DType, Strided, TypedRows};
use crate::mask::{position, visible, Params, Sequence, Vis};
use crate::memory::{filled, mul, zeroed, Alloc, NoMemory};
use crate::precision::Precision;
use crate::simd::pairs::PairUnit;
use crate::simd::{elem::Elem, round_up, Isa, Prefetch, Simd, MAX_LANES};
use crate::variants::{RowAt, TileFacts, Variants};
use half::{bf16, f16};

/// Query rows per task (all heads of a group together) and keys per tile. Measured on a 2-core
/// AVX2 machine (`docs/performance.md`, "Tile sizes ROWS and KEYS"): 64–128 rows and 64–256 keys are within 3% of each other;
/// 64 rows keep enough tasks for balance, 128 keys amortize the per-tile softmax bookkeeping.
const ROWS: usize = 64;
const KEYS: usize = 128;

/// Widest `2·LANES` of any ISA: padding to it fits every path.
const MAX_NR: usize = 2 * MAX_LANES;

/// How a call's prefill tiles use pair products (the `paired` step): the unit, and bf16 products per f32 product.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Paired {
    pub unit: PairUnit,
    pub terms: usize,
}

impl Paired {
    /// The mode for queries of `q` and keys/values of `kv` at `precision` on `isa`: bf16
    /// inputs always (one product: their values are exact in bf16), f32 queries over f32 or
    /// bf16 keys as `precision` allows; none for other types or without a unit.
    pub(crate) fn choose(q: DType, kv: DType, precision: Precision, isa: Isa) -> Option<Paired> {
        let terms = match (q, kv) {
            (DType::BF16, DType::BF16) => 1,
            (DType::F32, DType::F32 | DType::BF16) => precision.terms()?,
            _ => return None,
        };
        Some(Paired { unit: PairUnit::active(isa)?, terms })
    }
}

/// Per-worker buffers of the pair-product step (`paired`), empty until a call first takes it.
#[derive(Default)]
pub(crate) struct PairBufs {
    /// The task's queries as bf16 rows (`rows_p × terms·dp`), then as pair rows of Qᵀ
    /// (`terms·dp/2 × rows_p` words).
    pub qrows: Vec<u16>,
    pub qt: Vec<u32>,
    /// A key tile's rows (`bc × terms·dp`) when not read in place.
    pub k: Vec<u16>,
    /// A value tile's row pairs (`terms·bc/2 × dvp` words) and the probabilities' (`terms·bc/2
    /// × rows_p`).
    pub v: Vec<u32>,
    pub p: Vec<u32>,
    /// Whether `qt` holds this task's queries.
    pub ready: bool,
}

/// Sizes shared by every task of a call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// Query heads per KV head.
    pub group: usize,
    /// Queries per task (each with `group` rows).
    pub tq: usize,
    pub d: usize,
    pub dv: usize,
    /// Keys per tile.
    pub bc: usize,
}

impl Plan {
    /// Tasks never hold more queries than the longest of `seqs`, so neither does the scratch
    /// (a decode step's is then a fraction of a prefill's, zero-filled every call).
    pub(crate) fn new(group: usize, d: usize, dv: usize, seqs: &[Sequence]) -> Plan {
        let max_q = seqs.iter().map(|s| s.q_len).max().unwrap_or(1);
        Plan::for_queries(group, d, dv, max_q)
    }

    /// The plan for sequences of at most `max_q` queries. A group of zero query heads (a call
    /// with none, which has no task to plan) plans as one.
    pub(crate) fn for_queries(group: usize, d: usize, dv: usize, max_q: usize) -> Plan {
        Plan { group, tq: (ROWS / group.max(1)).max(1).min(max_q.max(1)), d, dv, bc: KEYS }
    }
}

/// One task: queries `i0..i1` of sequence `seq`, with every query head of KV head `kvh`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Task {
    pub seq: usize,
    pub kvh: usize,
    pub i0: usize,
    pub i1: usize,
}

/// What every task reads.
pub(crate) struct Ctx<'a> {
    pub q: &'a Strided<'a>,
    pub k: &'a Strided<'a>,
    pub v: Option<&'a Strided<'a>>,
    pub seqs: &'a [Sequence],
    pub params: &'a Params,
    pub variants: &'a Variants<'a>,
    pub plan: Plan,
    /// Whether prefill tiles run on bf16 pair products, and how.
    pub paired: Option<Paired>,
}

impl<'a> Ctx<'a> {
    /// The keys the rows of `task` see, as at most two ranges in order (the sinks, then the
    /// union of the rows' windows), empty ones dropped; tiles in between are never visited.
    pub(crate) fn key_ranges(&self, task: &Task) -> Vec<(usize, usize)> {
        let seq = &self.seqs[task.seq];
        let (mut sink, mut lo, mut hi) = (0, usize::MAX, 0);
        for i in task.i0..task.i1 {
            let v = visible(self.params, seq, i);
            sink = sink.max(v.sink);
            if v.lo < v.hi {
                lo = lo.min(v.lo);
                hi = hi.max(v.hi);
            }
        }
        let union = Vis { sink, lo: lo.min(hi), hi };
        union.ranges().into_iter().filter(|(a, b)| a < b).collect()
    }

    /// How many keys from key `n` (in the K/V token axis) lie one after another in memory in
    /// both K and V (see [`Strided::run_len`]): no tile may run past them.
    #[inline]
    pub(crate) fn run_len(&self, n: usize) -> usize {
        self.k.run_len(n).min(self.v.map_or(usize::MAX, |v| v.run_len(n)))
    }

    /// Whether keys or values are read through a block table.
    #[inline]
    pub(crate) fn paged(&self) -> bool {
        self.k.is_paged() || self.v.is_some_and(|v| v.is_paged())
    }

    /// Requests keys `k0..k1` of `task` (and their values) into the second-level cache, a
    /// block's run at a time: the steps' own requests run ahead along one pointer, which on
    /// paged K/V leaves the block (see `task`).
    pub(crate) fn request_keys(&self, task: &Task, k0: usize, k1: usize) {
        let seq = &self.seqs[task.seq];
        let (mut n, end) = (seq.k_start + k0, seq.k_start + k1);
        while n < end {
            let run = self.run_len(n).min(end - n);
            prefetch_of(self.k.typed_rows(seq.batch, task.kvh, n), self.plan.d).rows_l2(0, run);
            if let Some(v) = self.v {
                prefetch_of(v.typed_rows(seq.batch, task.kvh, n), self.plan.dv).rows_l2(0, run);
            }
            n += run;
        }
    }

    /// The values (kernels that make output rows run only with them).
    #[inline]
    pub(crate) fn values(&self) -> &'a Strided<'a> {
        self.v.expect("attention has values")
    }
}

/// Padded sizes of a task for one ISA.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub rows: usize,
    /// Score columns the softmax handles: `rows` rounded up to LANES (≤ `rows_p`).
    pub cols: usize,
    pub rows_p: usize,
    pub dvp: usize,
}

/// Per-worker buffers, reused across tasks.
pub(crate) struct Scratch {
    pub q: Queries,
    pub s: Scores,
    pub soft: Online,
    pub kv: Widened,
    pub int8: Int8,
    /// One converted input or output row.
    pub row: Vec<f32>,
    /// Buffers of the pair-product step (`paired`).
    pub pairs: PairBufs,
}

/// The task's queries, scaled (see [`load_queries`]), and what each row may see.
pub(crate) struct Queries {
    /// Transposed: `d × rows_p`, for the score gemm.
    pub t: Vec<f32>,
    /// Row-major (`rows × d`), for the few-rows (decode) score path.
    pub rows: Vec<f32>,
    /// Visible keys of each row, relative to the sequence.
    pub vis: Vec<Vis>,
    /// Where each row sits, for biases and masks.
    pub at: Vec<RowAt>,
}

/// The score tile of the keys at hand, then their probabilities.
pub(crate) struct Scores {
    /// Transposed (`bc × rows_p`), or row-major on the few-rows path.
    pub st: Vec<f32>,
    /// Whether the last score tile hid any key from a row (so a NaN value there must not
    /// reach every row).
    pub masked: bool,
    /// What the dense mask and bias hold, per key tile and row, over the current key range.
    pub facts: TileFacts,
}

/// Key and value tiles converted to f32, when they cannot be read in place. Empty until
/// [`tile_buffer`] first needs them: decode steps, and calls with f32 K and V, read tiles in
/// place, and zeroing 2 × 64 KiB per worker per call showed in short calls.
pub(crate) struct Widened {
    /// `bc × d`.
    pub k: Vec<f32>,
    /// `bc × dvp`, padded.
    pub v: Vec<f32>,
}

/// Buffers of the integer products with int8 keys and values.
pub(crate) struct Int8 {
    /// The int8 scales of one key tile, gathered.
    pub keyscale: Vec<f32>,
    /// Queries rounded to 16 bits (`rows × d`; on aarch64 as two planes of bytes) and their
    /// per-row scales, for the integer products of int8 keys.
    pub q16: Vec<i16>,
    pub qscale: Vec<f32>,
    /// Whether `q16` holds this task's queries: `None` until first asked for, then whether
    /// they could be rounded (finite).
    pub q16_ready: Option<bool>,
    /// Probabilities of up to 8 rows rounded to 16 bits, two keys per word, for int8 values
    /// (a key tile rounded up to whole vectors per row).
    pub pairs: Vec<i32>,
}

/// The lengths of a worker's buffers for a plan, checked against overflow: what
/// [`Scratch::new`] allocates and [`Sizes::bytes`] adds up.
struct Sizes {
    /// Query rows padded to every ISA's `2·LANES`.
    rows_p: usize,
    /// `d × rows_p`: each layout of the queries, and their 16-bit rounding.
    queries: usize,
    /// `bc × rows_p`: one score tile.
    scores: usize,
    /// `rows_p × dvp`: the output accumulators.
    acc: usize,
    /// Words of up to 8 rows' rounded probabilities (a tile per row).
    pairs: usize,
    /// One converted input or output row.
    row: usize,
}

impl Sizes {
    fn of(plan: &Plan) -> Alloc<Sizes> {
        let pad = |x: usize| x.checked_next_multiple_of(MAX_NR).ok_or(NoMemory { bytes: None });
        let rows_p = pad(mul(plan.group, plan.tq)?)?;
        Ok(Sizes {
            rows_p,
            queries: mul(plan.d, rows_p)?,
            scores: mul(plan.bc, rows_p)?,
            acc: mul(rows_p, pad(plan.dv)?)?,
            pairs: 8 * plan.bc.div_ceil(32) * 16,
            row: plan.d.max(plan.dv),
        })
    }

    /// Bytes of a worker's buffers (`None`: beyond a 64-bit size); the tiles widened on
    /// demand (`Widened`) are not counted.
    fn bytes(&self) -> Option<usize> {
        let per_row = 4 * 6 + size_of::<Vis>() + size_of::<RowAt>();
        let f32s = [self.queries, self.queries, self.scores, self.acc, KEYS, self.row];
        let floats = f32s.iter().try_fold(0usize, |a, &n| a.checked_add(n))?;
        floats
            .checked_mul(4)?
            .checked_add(self.queries.checked_mul(2)?)?
            .checked_add(self.rows_p.checked_mul(per_row)?)?
            .checked_add(4 * self.pairs)
    }
}

impl Scratch {
    pub(crate) fn new(plan: &Plan) -> Alloc<Scratch> {
        let n = Sizes::of(plan)?;
        let rows_p = n.rows_p;
        Ok(Scratch {
            q: Queries {
                t: zeroed(n.queries)?,
                rows: zeroed(n.queries)?,
                vis: filled(rows_p, Vis::default())?,
                at: filled(rows_p, RowAt { batch: 0, head: 0, qi: 0, pos: 0, k_start: 0 })?,
            },
            s: Scores { st: zeroed(n.scores)?, masked: false, facts: TileFacts::default() },
            soft: Online::new(rows_p, n.acc)?,
            kv: Widened { k: Vec::new(), v: Vec::new() },
            int8: Int8 {
                keyscale: zeroed(plan.bc)?,
                q16: zeroed(n.queries)?,
                qscale: zeroed(rows_p)?,
                q16_ready: None,
                pairs: zeroed(n.pairs)?,
            },
            row: zeroed(n.row)?,
            pairs: PairBufs::default(),
        })
    }

    /// Bytes [`Scratch::new`] allocates for `plan` (`None`: beyond a 64-bit size).
    pub(crate) fn bytes(plan: &Plan) -> Option<usize> {
        Sizes::of(plan).ok()?.bytes()
    }
}

/// `buf`, made `len` zeros on first use (padding columns are never written, so stay zero).
pub(crate) fn tile_buffer(buf: &mut Vec<f32>, len: usize) -> Alloc<*mut f32> {
    if buf.len() < len {
        *buf = zeroed(len)?;
    }
    Ok(buf.as_mut_ptr())
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
pub(crate) fn query_mul(ctx: &Ctx) -> f32 {
    match ctx.params.softcap {
        Some(_) => ctx.params.scale,
        None => ctx.params.scale * std::f32::consts::LOG2_E,
    }
}

/// Packs the task's scaled queries (transposed and row-major) and their visible ranges.
/// Returns the padded sizes.
#[inline(always)]
pub(crate) fn load_queries<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch) -> Dims {
    let plan = &ctx.plan;
    let nr = 2 * S::LANES;
    let rows = plan.group * (task.i1 - task.i0);
    let dims = Dims { rows, cols: round_up(rows, S::LANES), rows_p: round_up(rows, nr), dvp: round_up(plan.dv, nr) };
    let seq = &ctx.seqs[task.seq];
    let (d, rows_p) = (plan.d, dims.rows_p);
    let q = &mut sc.q;
    for r in 0..rows_p {
        if r < rows {
            let (h, i) = row_of(plan, task, r);
            ctx.q.read_row(seq.batch, h, seq.q_start + i, &mut sc.row, query_mul(ctx));
            for (dd, &x) in sc.row[..d].iter().enumerate() {
                q.t[dd * rows_p + r] = x;
            }
            q.rows[r * d..(r + 1) * d].copy_from_slice(&sc.row[..d]);
            q.vis[r] = visible(ctx.params, seq, i);
            q.at[r] = RowAt {
                batch: seq.batch,
                head: h,
                qi: seq.q_start + i,
                pos: position(ctx.params, seq, i),
                k_start: seq.k_start,
            };
        } else {
            q.vis[r] = Vis::default();
        }
    }
    // Padding columns of Qᵀ are zero, so the score gemm's padding lanes stay finite; written
    // row by row (contiguous), not column by column.
    if rows < rows_p {
        for dd in 0..d {
            q.t[dd * rows_p + rows..(dd + 1) * rows_p].fill(0.0);
        }
    }
    sc.int8.q16_ready = None;
    sc.pairs.ready = false;
    dims
}

/// Whether the masks let no row of the task see any key of `k0..k0 + kn` (the tile is then
/// skipped); `ctx.variants.scan` must have covered the tile.
#[inline(always)]
pub(crate) fn tile_is_dead(ctx: &Ctx, sc: &Scratch, dims: &Dims, k0: usize, kn: usize) -> bool {
    ctx.variants.masks() && !ctx.variants.tile_live(&sc.q.at[..dims.rows], k0, kn, sc.s.facts.tile(k0))
}

/// `Sᵀ` of keys `k0..k0 + kn` against the task's rows into `sc.s.st`: softcapped, and −∞
/// where a row may not look. Fails only when a tile of keys to widen cannot be allocated.
///
/// # Safety
/// The scratch is sized for the plan; `k0..k0 + kn` are keys of the task's sequence.
#[inline(always)]
pub(crate) unsafe fn score_tile<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
) -> Alloc<()> {
    let plan = &ctx.plan;
    let seq = &ctx.seqs[task.seq];
    let (d, rows_p) = (plan.d, dims.rows_p);
    let first = seq.k_start + k0;
    let (a, lda) = match ctx.k.f32_rows(seq.batch, task.kvh, first) {
        Some(direct) => direct,
        None => {
            let buf = tile_buffer(&mut sc.kv.k, mul(plan.bc, d)?)?;
            // SAFETY: the buffer holds bc × d floats; the rows come from the validated view.
            unsafe { widen_rows::<S>(ctx.k.typed_rows(seq.batch, task.kvh, first), kn, d, buf, d) };
            (sc.kv.k.as_ptr(), d as isize)
        }
    };
    // SAFETY: A is kn rows of d floats (in place: rows of the validated view), Qᵀ is d × rows_p,
    // Q rows × d, Sᵀ is bc × rows_p; rows_p is a multiple of 2·LANES.
    unsafe {
        if !scores_few::<S, f32>(a, lda, sc, dims, d, kn, Prefetch::NONE) {
            let a = A { p: a, rs: lda, ks: 1 };
            let (qt, st) = (B::new(sc.q.t.as_ptr(), rows_p as isize), C::new(sc.s.st.as_mut_ptr(), rows_p));
            gemm::<S, f32>(a, qt, st, kn, rows_p, d, false);
        }
    }
    mask_tile(ctx, sc, dims, k0, kn);
    Ok(())
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
    let (q, st, rows_p) = (sc.q.rows.as_ptr(), sc.s.st.as_mut_ptr(), dims.rows_p);
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
    let st = &mut sc.s.st[..kn * rows_p];
    if let Some(c) = ctx.params.softcap {
        let (inv, mul) = (1.0 / c, c * std::f32::consts::LOG2_E);
        st.iter_mut().for_each(|x| *x = mul * (*x * inv).tanh());
    }
    // Padding columns are left as they are: softmax lanes are columns, so whatever they hold
    // stays in their own lanes, and P·V reads real rows only.
    let mut masked = false;
    for r in 0..dims.rows {
        let vis = sc.q.vis[r];
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
    let facts = sc.s.facts.tile(k0);
    masked |= ctx.variants.apply(&sc.q.at[..dims.rows], k0, kn, st, rows_p, std::f32::consts::LOG2_E, facts);
    sc.s.masked = masked;
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
            TypedRows::F16(p, lds) => widen::<S, f16>(p, lds, None, n, d, dst, ld),
            TypedRows::BF16(p, lds) => widen::<S, bf16>(p, lds, None, n, d, dst, ld),
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

/// Multiplies transposed score/probability row `j` (one key) by that key's int8 scale.
///
/// # Safety
/// `scales` holds `kn` scales `ld` apart.
#[inline(always)]
pub(crate) unsafe fn scale_rows(sc: &mut Scratch, dims: &Dims, kn: usize, scales: *const f32, ld: isize) {
    for j in 0..kn {
        // SAFETY: forwarded.
        let s = unsafe { *scales.offset(j as isize * ld) };
        sc.s.st[j * dims.rows_p..j * dims.rows_p + dims.cols].iter_mut().for_each(|x| *x *= s);
    }
}

/// `acc += P · V` with V rows read in place; P's element `(row, key)` is at `p + row·rs +
/// key·ks` (the transposed tile or the row-major one); `pf` requests the value rows ahead
/// ([`Prefetch::NONE`] where they were requested already).
///
/// # Safety
/// `v` holds `kn` rows of `dvp` elements `ld` apart; P holds `rows × kn` probabilities.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pv<S: Simd, E: Elem>(
    sc: &mut Scratch,
    dims: &Dims,
    p: *const f32,
    rs: isize,
    ks: isize,
    v: *const E,
    ld: isize,
    kn: usize,
    pf: Prefetch,
) {
    let dvp = dims.dvp;
    let (a, b, acc) = (A { p, rs, ks }, B::new(v, ld), C::new(sc.soft.acc.as_mut_ptr(), dvp));
    // Decoding (few rows): blocks of at most 4 rows, V read in one pass. Many rows
    // (prefill): the 6-row block, whose widening loads convert in place.
    if dims.rows > 8 {
        // SAFETY: as below, for all rows at once.
        unsafe { gemm::<S, E>(a, b, acc, dims.rows, dvp, kn, true) };
        return;
    }
    // Later blocks read V again, from cache: the requests go with the first.
    for (r0, m, pf) in pf.passes(dims.rows, 4) {
        // SAFETY: P from row r0, acc rows × dvp (from row r0), V kn × dvp (dv == dvp checked).
        unsafe {
            let (a, c) = (A { p: p.offset(r0 as isize * rs), ..a }, C::new(acc.p.add(r0 * dvp), dvp));
            stream_rows::<S, E>(a, b, c, m, dvp, kn, pf)
        }
    }
}

/// `acc += P · V` from the transposed probability tile, with value rows read in place in their
/// storage type (int8 scales folded into the probabilities first).
///
/// # Safety
/// The scratch is sized for the plan; `vrows` holds `kn` readable rows of `dims.dvp` elements.
#[inline(always)]
pub(crate) unsafe fn pv_transposed<S: Simd>(sc: &mut Scratch, dims: &Dims, vrows: TypedRows, kn: usize) {
    let (st, rs, ks) = (sc.s.st.as_ptr(), 1, dims.rows_p as isize);
    // SAFETY: forwarded.
    unsafe {
        match vrows {
            TypedRows::F32(p, ld) => pv::<S, f32>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::F16(p, ld) => pv::<S, f16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::BF16(p, ld) => pv::<S, bf16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::I8(p, ld, s, sld) => {
                scale_rows(sc, dims, kn, s, sld);
                pv::<S, i8>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE)
            }
            TypedRows::Unreadable => unreachable!("attention checked that the view is readable"),
        }
    }
}

/// Requests for `width` elements of each row of `rows`.
pub(crate) fn prefetch_of(rows: TypedRows, width: usize) -> Prefetch {
    match rows {
        TypedRows::F32(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::F16(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::BF16(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::I8(p, ld, _, _) => Prefetch::of(p, ld, width),
        TypedRows::Unreadable => Prefetch::NONE,
    }
}
