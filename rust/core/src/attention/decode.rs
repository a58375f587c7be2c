//! The few-rows path (decoding): keys and values read once, straight from their storage type;
//! and split-K, which spreads the keys of too few tasks over the threads and merges after.
//!
//! With one or a few query tokens, each K/V element feeds only the handful of query heads of
//! its group, so the work is bound by reading K and V. This path reads the rows in place —
//! f32, f16, bf16 or int8 — and widens them in registers: no tile is converted into a buffer.
//! int8 scales are per row, so they multiply a key's scores after the dot products and a
//! value's probabilities before P·V. A task's tile loop offers each tile here first
//! ([`typed_tile`]); what this path declines goes through the blocked step (`prefill`).
//!
//! A decode step has one task per sequence and KV head, often fewer than threads: its keys are
//! then cut into parts ([`split_keys`]) that run as tasks of their own, each leaving a partial
//! softmax state, and [`merge`] combines them exactly (flash-decoding).

use super::dots::scores_rows;
use super::online::{finish_row, merge_row, partial_len};
use super::output::Output;
use super::tile::{
    mask_tile, prefetch_of, pv, pv_transposed, row_of, scale_rows, scores_few, Ctx, Dims, Plan, Scratch, Task,
};
use crate::layout::{DType, TypedRows};
use crate::memory::{mul, with_capacity, zeroed, Alloc, NoMemory};
use crate::parallel;
use crate::simd::{request_one_row_streams, Prefetch, Simd};
use half::{bf16, f16};

/// Keys per step for a streamed row (see [`streamed_row`]): K and V are read in runs this
/// long, one row after another, so that the hardware prefetchers see two long streams. On
/// Zen 4, with 128-key tiles and requests ahead (the scheme of the GQA rows, where each key
/// feeds several rows' arithmetic) one core read 21–23 GB/s of fp32; this way, without
/// requests, 26–28, and int8 on the VNNI path 19 → 28 (`docs/performance.md`, "One-row streams
/// and ONE_ROW_KEYS"). Where the runs are also requested ahead, see [`request_one_row_streams`].
pub(crate) const ONE_ROW_KEYS: usize = 2048;

/// How many keys a task's tile loop hands to [`typed_tile`] at a time: [`ONE_ROW_KEYS`] for a plain
/// streamed row that sees all of `kmin..kmax`, the plan's tile otherwise.
pub(crate) fn keys_per_step<S: Simd>(ctx: &Ctx, sc: &Scratch, dims: &Dims, kmin: usize, kmax: usize) -> usize {
    let one_row = streamed_row::<S>(ctx, dims) && ctx.variants.is_plain();
    if one_row && sc.q.vis[0].sees_all(kmin, kmax) && ldr(ONE_ROW_KEYS) <= sc.s.st.len() {
        ONE_ROW_KEYS
    } else {
        ctx.plan.bc
    }
}

/// A task of one row (a decode step without GQA) whose keys are read as a plain stream: in
/// [`ONE_ROW_KEYS`] runs, each row whole and in address order (with software requests only
/// where [`request_one_row_streams`] says so).
/// Float keys on every path; int8 keys on the AVX-512 path only, whose integer (VNNI) or
/// widening arithmetic keeps up with the stream. The AVX2 path's int8 arithmetic does not
/// (measured 1.26× slower this way), and there the requests ahead pay.
fn streamed_row<S: Simd>(ctx: &Ctx, dims: &Dims) -> bool {
    dims.rows == 1 && (ctx.k.dtype() != DType::I8 || S::LANES == 16)
}

/// `buf` holding at least `len` elements (grown, zero-filled, on first need).
fn at_least<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}

/// Runs keys `k0..k0 + kn` of `task` through the typed path when it applies (few rows, every
/// row sees the whole tile, the value width a multiple of the vector pair); returns false
/// otherwise, leaving everything untouched. `kn` may exceed the plan's tile only where the
/// row-major layout holds it.
///
/// # Safety
/// The scratch is sized for the plan; the views were validated.
#[inline(always)]
pub(crate) unsafe fn typed_tile<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
) -> bool {
    let plan = ctx.plan;
    if dims.rows > 8 || dims.rows * 2 > dims.rows_p || plan.dv != dims.dvp || ctx.variants.masks() {
        return false;
    }
    // A partly masked tile takes the general path (it also keeps NaN values of masked keys
    // away from the rows that do not see them).
    if !(0..dims.rows).all(|r| sc.q.vis[r].sees_all(k0, k0 + kn)) {
        return false;
    }
    let seq = &ctx.seqs[task.seq];
    let first = seq.k_start + k0;
    let (krows, vrows) =
        (ctx.k.typed_rows(seq.batch, task.kvh, first), ctx.values().typed_rows(seq.batch, task.kvh, first));
    if matches!(krows, TypedRows::Unreadable) || matches!(vrows, TypedRows::Unreadable) {
        return false;
    }
    if ctx.variants.is_plain() && dims.rows * ldr(kn.max(plan.bc)) <= sc.s.st.len() {
        // SAFETY: forwarded; the score rows fit in `st` (checked above).
        unsafe { row_major::<S>(ctx, sc, dims, krows, vrows, kn) };
        return true;
    }
    // The transposed layout holds one tile.
    // SAFETY: forwarded.
    kn <= plan.bc && unsafe { transposed::<S>(ctx, sc, dims, krows, vrows, k0, kn) }
}

/// The tile with scores kept transposed, as the blocked step keeps them: for attention with
/// biases, which fold into that layout. Returns false (the blocked step then runs) when there
/// are too many rows for dot products.
///
/// # Safety
/// As for [`typed_tile`]; `kn` is at most the plan's tile.
#[inline(always)]
unsafe fn transposed<S: Simd>(
    ctx: &Ctx,
    sc: &mut Scratch,
    dims: &Dims,
    krows: TypedRows,
    vrows: TypedRows,
    k0: usize,
    kn: usize,
) -> bool {
    let plan = ctx.plan;
    // Paged rows past the tile lie in another block: the tile loop requests them.
    let pf = if ctx.paged() { Prefetch::NONE } else { prefetch_of(vrows, plan.dv) };
    // SAFETY: rows come from validated views (kn rows in range); scratch sized by the plan.
    unsafe {
        let ok = match krows {
            TypedRows::F32(p, ld) => scores_few::<S, f32>(p, ld, sc, dims, plan.d, kn, pf),
            TypedRows::F16(p, ld) => scores_few::<S, f16>(p, ld, sc, dims, plan.d, kn, pf),
            TypedRows::BF16(p, ld) => scores_few::<S, bf16>(p, ld, sc, dims, plan.d, kn, pf),
            TypedRows::I8(p, ld, s, sld) => {
                let ok = scores_few::<S, i8>(p, ld, sc, dims, plan.d, kn, pf);
                scale_rows(sc, dims, kn, s, sld);
                ok
            }
            TypedRows::Unreadable => false,
        };
        if !ok {
            return false;
        }
        mask_tile(ctx, sc, dims, k0, kn);
        sc.soft.update_cols::<S>(&mut sc.s.st, dims.rows_p, dims.cols, kn);
        sc.soft.rescale(dims.rows, dims.dvp);
        pv_transposed::<S>(sc, dims, vrows, kn);
    }
    true
}

/// Stride of the row-major score rows: the key tile padded to whole vectors of every ISA.
fn ldr(bc: usize) -> usize {
    bc.div_ceil(32) * 32
}

/// The tile with scores kept row-major (`rows × keys`, rows `ldr` of the keys at hand apart):
/// four keys' dot products finish in one shuffle tree, the softmax runs along keys a whole
/// vector at a time, and int8 scales multiply vectors of keys. Only for plain attention (no
/// mask or bias, which fold into the transposed layout).
///
/// K and V are each read once, in order. With several rows they are requested ahead while
/// they are read (see [`Prefetch::ahead`]): the keys during the scores, the values during
/// P·V. A streamed row is requested only where that measured faster
/// ([`request_one_row_streams`]); elsewhere the hardware prefetchers follow its long runs of
/// rows read one after another (see [`streamed_row`]).
///
/// # Safety
/// As for [`typed_tile`]; `rows · ldr(max(kn, bc))` floats fit in `sc.s.st`.
#[inline(always)]
unsafe fn row_major<S: Simd>(ctx: &Ctx, sc: &mut Scratch, dims: &Dims, krows: TypedRows, vrows: TypedRows, kn: usize) {
    let plan = ctx.plan;
    let ld = ldr(kn.max(plan.bc));
    let one_row_plain = streamed_row::<S>(ctx, dims) && !request_one_row_streams(S::LANES == 16);
    // Paged rows past the tile lie in another block: the tile loop requests them.
    let (pf, vpf) = if one_row_plain || ctx.paged() {
        (Prefetch::NONE, Prefetch::NONE)
    } else {
        (prefetch_of(krows, plan.d), prefetch_of(vrows, plan.dv))
    };
    if matches!(krows, TypedRows::I8(..)) || matches!(vrows, TypedRows::I8(..)) {
        // int8 scales and rounded probabilities, per key: a streamed run is longer than a tile.
        at_least(&mut sc.int8.keyscale, kn);
        at_least(&mut sc.int8.pairs, dims.rows * ld / 2);
    }
    let (q, st, rows, d) = (sc.q.rows.as_ptr(), sc.s.st.as_mut_ptr(), dims.rows, plan.d);
    // SAFETY: rows come from validated views (kn rows in range); scratch sized by the plan.
    unsafe {
        match krows {
            TypedRows::F32(p, lk) => scores_rows::<S, f32>(p, lk, q, d, st, ld, rows, kn, pf),
            TypedRows::F16(p, lk) => scores_rows::<S, f16>(p, lk, q, d, st, ld, rows, kn, pf),
            TypedRows::BF16(p, lk) => scores_rows::<S, bf16>(p, lk, q, d, st, ld, rows, kn, pf),
            TypedRows::I8(p, lk, s, sld) => {
                if !int8_dots::<S>(p, lk, sc, rows, d, ld, kn, pf) {
                    scores_rows::<S, i8>(p, lk, q, d, st, ld, rows, kn, pf);
                }
                scale_keys::<S>(sc, dims.rows, ld, kn, s, sld);
            }
            TypedRows::Unreadable => unreachable!("checked by the caller"),
        }
        if let Some(c) = ctx.params.softcap {
            let (inv, mul) = (1.0 / c, c * std::f32::consts::LOG2_E);
            for r in 0..dims.rows {
                sc.s.st[r * ld..r * ld + kn].iter_mut().for_each(|x| *x = mul * (*x * inv).tanh());
            }
        }
        sc.soft.update_rows::<S>(&mut sc.s.st, dims.rows, ld, kn);
        sc.soft.rescale(dims.rows, dims.dvp);
        let st = sc.s.st.as_ptr();
        match vrows {
            TypedRows::F32(p, lv) => pv::<S, f32>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::F16(p, lv) => pv::<S, f16>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::BF16(p, lv) => pv::<S, bf16>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::I8(p, lv, s, sld) => {
                scale_keys::<S>(sc, dims.rows, ld, kn, s, sld);
                if !int8_pv::<S>(sc, dims, ld, p, lv, kn, vpf) {
                    pv::<S, i8>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf)
                }
            }
            TypedRows::Unreadable => unreachable!("checked by the caller"),
        }
    }
}

/// `acc += P · V` for int8 values with integer dot products, where the AVX-512 path runs on a
/// CPU with VNNI: each row's probabilities (value scales folded in) are rounded to 16 bits
/// against the row's largest in the tile. Returns false (nothing written) otherwise.
///
/// # Safety
/// P is the row-major tile (`ld` apart) with value scales applied; `v` holds `kn` rows of
/// `dims.dvp` int8 `ldv` apart.
#[inline(always)]
unsafe fn int8_pv<S: Simd>(
    sc: &mut Scratch,
    dims: &Dims,
    ld: usize,
    v: *const i8,
    ldv: isize,
    kn: usize,
    pf: Prefetch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::vnni;
        if S::LANES == 16 && dims.dvp.is_multiple_of(32) && vnni::available() {
            // Whole vectors of keys: the softmax left zeros past the last key.
            let kp = kn.div_ceil(16) * 16;
            if dims.rows == 1 && kp <= vnni::PV_BLOCK * 64 {
                // One scale per block of keys, as a tile has: a whole run rounded against its
                // largest probability would round the small ones coarser.
                let mut scales = [0f32; 64];
                for (b, s) in scales.iter_mut().enumerate().take(kp.div_ceil(vnni::PV_BLOCK)) {
                    let (k0, n) = (b * vnni::PV_BLOCK, vnni::PV_BLOCK.min(kp - b * vnni::PV_BLOCK));
                    // SAFETY: the CPU has the features (checked); the row holds kp ≤ ld floats
                    // and `pairs` ld / 2 words.
                    match unsafe {
                        vnni::pack_probs(sc.s.st.as_ptr().add(k0), n, sc.int8.pairs.as_mut_ptr().add(k0 / 2))
                    } {
                        Some(x) => *s = x,
                        None => return false,
                    }
                }
                // SAFETY: the CPU has the features (checked); one row of kp / 2 words and of `dvp`
                // accumulators; V as the caller vouched.
                unsafe {
                    vnni::pv_one(
                        sc.int8.pairs.as_ptr(),
                        scales.as_ptr(),
                        v,
                        ldv,
                        dims.dvp,
                        kn,
                        sc.soft.acc.as_mut_ptr(),
                        pf,
                    )
                };
                return true;
            }
            let ldp = kp / 2;
            let mut scales = [0f32; 8];
            // Every row is rounded before anything is accumulated, so a row that cannot be
            // (NaN or ∞) sends the whole tile to the float path untouched.
            for (r, s) in scales.iter_mut().enumerate().take(dims.rows) {
                // SAFETY: the CPU has the features (checked); row r holds kp ≤ ld floats and
                // `pairs` 8 rows of ld / 2 words.
                match unsafe {
                    vnni::pack_probs(sc.s.st.as_ptr().add(r * ld), kp, sc.int8.pairs.as_mut_ptr().add(r * ldp))
                } {
                    Some(x) => *s = x,
                    None => return false,
                }
            }
            let (pairs, acc, dvp) = (sc.int8.pairs.as_ptr(), sc.soft.acc.as_mut_ptr(), dims.dvp);
            for (r0, m, pf) in pf.passes(dims.rows, 4) {
                // SAFETY: the CPU has the features (checked); rows r0..r0 + m of `ldp` words and
                // of `dvp` accumulators; V as the caller vouched.
                unsafe {
                    let (p, s, c) = (pairs.add(r0 * ldp), scales.as_ptr().add(r0), acc.add(r0 * dvp));
                    vnni::pv_i8(p, ldp, s, m, v, ldv, dvp, kn, c, dvp, pf)
                };
            }
            return true;
        }
    }
    let _ = (sc, dims, ld, v, ldv, kn, pf);
    false
}

/// [`scores_rows`] for int8 keys with integer dot products, where the AVX-512 path runs on a
/// CPU with VNNI or the NEON path on one with `dotprod`; returns false (nothing written)
/// otherwise.
///
/// # Safety
/// As for [`scores_rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn int8_dots<S: Simd>(
    k: *const i8,
    ldk: isize,
    sc: &mut Scratch,
    rows: usize,
    d: usize,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::vnni;
        // LANES == 16 is the AVX-512 path: a forced lower path never reaches these instructions.
        if S::LANES == 16
            && d.is_multiple_of(32)
            && d <= vnni::MAX_D
            && vnni::available()
            && *sc
                .int8
                .q16_ready
                .get_or_insert_with(|| vnni::quantize(&sc.q.rows, rows, d, &mut sc.int8.q16, &mut sc.int8.qscale))
        {
            let (q16, qs, st) = (sc.int8.q16.as_ptr(), sc.int8.qscale.as_ptr(), sc.s.st.as_mut_ptr());
            // SAFETY: the CPU has the features (checked); d is a multiple of 32; Q was rounded
            // for `rows` rows; the rest is forwarded.
            unsafe { vnni::scores(k, ldk, q16, qs, rows, d, st, ld, kn, pf) };
            return true;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        use crate::simd::dotprod;
        // LANES == 4 is the NEON path: a forced scalar path never reaches these instructions.
        if S::LANES == 4 && d.is_multiple_of(16) && d <= dotprod::MAX_D && dotprod::available() {
            // SAFETY: an i16 buffer read as twice as many bytes (both plain integers).
            let planes =
                unsafe { std::slice::from_raw_parts_mut(sc.int8.q16.as_mut_ptr() as *mut i8, 2 * sc.int8.q16.len()) };
            let qs = &mut sc.int8.qscale;
            if *sc.int8.q16_ready.get_or_insert_with(|| dotprod::quantize(&sc.q.rows, rows, d, planes, qs)) {
                let (pl, qs, st) = (sc.int8.q16.as_ptr() as *const i8, sc.int8.qscale.as_ptr(), sc.s.st.as_mut_ptr());
                // SAFETY: the CPU has the feature (checked); d is a multiple of 16 within MAX_D; Q
                // was rounded for `rows` rows; the rest is forwarded.
                unsafe { dotprod::scores(k, ldk, pl, qs, rows, d, st, ld, kn) };
                return true;
            }
        }
    }
    let _ = (k, ldk, sc, rows, d, ld, kn, pf);
    false
}

/// Multiplies column `j` (one key) of the row-major tile by that key's int8 scale: the scales
/// are gathered once, then applied a vector of keys at a time.
///
/// # Safety
/// `scales` holds `kn` scales `sld` apart; `rows · ld` floats fit in `sc.s.st`.
#[inline(always)]
unsafe fn scale_keys<S: Simd>(sc: &mut Scratch, rows: usize, ld: usize, kn: usize, scales: *const f32, sld: isize) {
    let l = S::LANES;
    let body = kn - kn % l;
    let ks = &mut sc.int8.keyscale[..kn];
    for (j, x) in ks.iter_mut().enumerate() {
        // SAFETY: forwarded.
        *x = unsafe { *scales.offset(j as isize * sld) };
    }
    for r in 0..rows {
        let row = &mut sc.s.st[r * ld..r * ld + kn];
        // SAFETY: body ≤ kn floats of both slices.
        unsafe {
            for c in (0..body).step_by(l) {
                let p = row.as_mut_ptr().add(c);
                S::store(p, S::fma(S::load(p), S::load(ks.as_ptr().add(c)), S::zero()));
            }
        }
        row[body..].iter_mut().zip(&ks[body..]).for_each(|(x, s)| *x *= s);
    }
}

/// Keys per slice below which splitting a task's keys is not worth the merge.
const MIN_SPLIT: usize = 512;

/// One slice of a task's keys, for split-K.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Part {
    /// Index of the task in the call's task list.
    pub task: usize,
    pub k0: usize,
    pub k1: usize,
}

/// When there are too few tasks to keep every thread busy (decoding: one query per sequence),
/// splits each task's keys into slices computed in parallel and merged after (flash-decoding).
/// Returns `None` when no task is split. The parts of one task are consecutive.
pub(crate) fn split_keys(ctx: &Ctx, work: &[Task], threads: usize) -> Option<Vec<Part>> {
    let want = 4 * threads;
    if threads < 2 || work.is_empty() || work.len() >= want {
        return None;
    }
    let per_task = want.div_ceil(work.len());
    let mut parts = Vec::new();
    let mut split_any = false;
    for (t, task) in work.iter().enumerate() {
        let ranges = ctx.key_ranges(task);
        let (Some(&(lo, _)), Some(&(_, hi))) = (ranges.first(), ranges.last()) else {
            parts.push(Part { task: t, k0: 0, k1: 0 });
            continue;
        };
        let n = per_task.min((hi - lo) / MIN_SPLIT).max(1);
        let chunk = (hi - lo).div_ceil(n).div_ceil(ctx.plan.bc) * ctx.plan.bc;
        split_any |= n > 1;
        let mut k0 = lo;
        while k0 < hi {
            parts.push(Part { task: t, k0, k1: (k0 + chunk).min(hi) });
            k0 += chunk;
        }
    }
    split_any.then_some(parts)
}

/// Floats of the partial state each part leaves (see [`partial_len`]).
pub(crate) fn part_len(plan: &Plan) -> Alloc<usize> {
    partial_len(mul(plan.group, plan.tq)?, plan.dv).ok_or(NoMemory { bytes: None })
}

/// Merges the partial states of each task's parts (part `i`'s at `partial[i · part_len..]`)
/// into the task's output rows.
pub(crate) fn merge(ctx: &Ctx, work: &[Task], parts: &[Part], partial: &[f32], out: &Output) -> Alloc<()> {
    let (plan, dv) = (ctx.plan, ctx.plan.dv);
    let slot = part_len(&plan)?;
    // Parts of one task are consecutive: merge each task's slices into its rows.
    let mut firsts = with_capacity(parts.len() + 1)?;
    firsts.extend((0..parts.len()).filter(|&i| i == 0 || parts[i - 1].task != parts[i].task));
    firsts.push(parts.len());
    parallel::try_for_each(
        firsts.len() - 1,
        || Ok((zeroed::<f32>(dv)?, zeroed::<f32>(dv)?)),
        |(acc, row), t| {
            let (first, end) = (firsts[t], firsts[t + 1]);
            let task = &work[parts[first].task];
            let slices: Vec<&[f32]> = (first..end).map(|i| &partial[i * slot..(i + 1) * slot]).collect();
            let seq = &ctx.seqs[task.seq];
            let rows = plan.group * (task.i1 - task.i0);
            for r in 0..rows {
                let (m, l) = merge_row(&slices, rows, dv, r, acc);
                let (h, i) = row_of(&plan, task, r);
                let lse = finish_row(acc, m, l, row, ctx.variants.sink(h));
                // SAFETY: each task's rows are written by this closure only.
                unsafe { out.write(seq, h, seq.q_start + i, row, lse) };
            }
            Ok(())
        },
    )
}
