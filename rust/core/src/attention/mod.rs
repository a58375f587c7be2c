//! Scaled-dot-product attention over strided views: argument checks, the split into tasks, and
//! the dispatch of each task to the kernel of the active ISA.
//!
//! A task is one sequence × one KV head × one tile of queries, holding the rows of *all* query
//! heads that share the KV head (GQA/MQA): each K/V tile is converted and packed once for the
//! whole group, and tasks are independent, so rayon balances causal and windowed work by
//! stealing.

mod blocked;
mod decode;
pub(crate) mod gemm;
mod softmax;
#[cfg(target_arch = "x86_64")]
mod vnni;
mod weights;

use crate::error::{ensure_shape, Error, Result};
use crate::extras::Extras;
use crate::layout::{DType, RowWriter, Strided, StridedMut};
use crate::mask::{visible, Params, Sequence, Vis};
use crate::parallel;
use crate::simd::Isa;
use rayon::prelude::*;
use std::sync::Mutex;

/// Query rows per task (all heads of a group together) and keys per tile. Measured on a 2-core
/// AVX2 machine (benches/NOTES.md): 64–128 rows and 64–256 keys are within 3% of each other;
/// 64 rows keep enough tasks for balance, 128 keys amortize the per-tile softmax bookkeeping.
const ROWS: usize = 64;
const KEYS: usize = 128;

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
    fn new(group: usize, d: usize, dv: usize, seqs: &[Sequence]) -> Plan {
        let max_q = seqs.iter().map(|s| s.q_len).max().unwrap_or(1).max(1);
        Plan { group, tq: (ROWS / group).max(1).min(max_q), d, dv, bc: KEYS }
    }
}

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
    pub extras: &'a Extras<'a>,
    pub plan: Plan,
}

impl Ctx<'_> {
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
}

/// Raw destination for the log-sum-exp, `(B, Hq, Sq)` contiguous.
#[derive(Clone, Copy)]
pub(crate) struct LsePtr(*mut f32);
// SAFETY: each task writes the LSE of its own rows only; rows of different tasks are disjoint.
unsafe impl Send for LsePtr {}
// SAFETY: as for Send.
unsafe impl Sync for LsePtr {}

/// Output sinks of [`attention`].
pub(crate) struct Sinks<'a> {
    pub out: RowWriter<'a>,
    pub lse: Option<LsePtr>,
    /// Strides of the LSE buffer for (batch, head, token).
    pub lse_dims: [usize; 3],
}

impl Sinks<'_> {
    /// Writes one output row and its LSE.
    ///
    /// # Safety
    /// No other thread may write the same row concurrently.
    pub(crate) unsafe fn write(&self, seq: &Sequence, h: usize, i: usize, row: &[f32], lse: f32) {
        // SAFETY: forwarded from the caller.
        unsafe { self.out.write_row(seq.batch, h, i, row) };
        if let Some(ptr) = self.lse {
            let at = seq.batch * self.lse_dims[0] + h * self.lse_dims[1] + i * self.lse_dims[2];
            // SAFETY: `attention` checked the buffer holds B·Hq·Sq entries; the row is ours.
            unsafe { *ptr.0.add(at) = lse };
        }
    }
}

/// Task indices, the most rows × visible keys first (ties in their order): claimed that way,
/// the long tasks of a causal prefill start first and the short ones fill in at the end,
/// instead of a long one left to run alone.
fn longest_first(ctx: &Ctx, work: &[Task]) -> Vec<usize> {
    let cost: Vec<usize> =
        work.iter().map(|t| (t.i1 - t.i0) * ctx.key_ranges(t).iter().map(|(a, b)| b - a).sum::<usize>()).collect();
    let mut order: Vec<usize> = (0..work.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cost[i]));
    order
}

/// Keys per slice below which splitting a task's keys is not worth the merge.
const MIN_SPLIT: usize = 512;

/// One slice of a task's keys, for split-K.
#[derive(Clone, Copy, Debug)]
struct Part {
    task: usize,
    k0: usize,
    k1: usize,
}

/// When there are too few tasks to keep every thread busy (decoding: one query per sequence),
/// splits each task's keys into slices computed in parallel and merged after (flash-decoding).
/// Returns `None` when no task is split.
fn split_keys(ctx: &Ctx, work: &[Task], threads: usize) -> Option<Vec<Part>> {
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

fn check_inputs(q: &Strided, k: &Strided, v_shape: [usize; 4], seqs: &[Sequence], params: &Params) -> Result<()> {
    params.validate()?;
    let [b, hq, sq, d] = q.shape();
    let [bk, hk, sk, dk] = k.shape();
    ensure_shape!(d >= 1, "q: head dimension must be at least 1, got shape {:?}", q.shape());
    ensure_shape!(bk == b, "q and k have different batch sizes: {:?} vs {:?}", q.shape(), k.shape());
    ensure_shape!(dk == d, "q and k have different head dimensions: {:?} vs {:?}", q.shape(), k.shape());
    ensure_shape!(
        hk >= 1 && hq % hk == 0,
        "query heads ({hq}) must be a multiple of key/value heads ({hk}); q {:?}, k {:?}",
        q.shape(),
        k.shape()
    );
    ensure_shape!(
        v_shape[..3] == k.shape()[..3],
        "k and v must agree in batch, heads and length: k {:?}, v {v_shape:?}",
        k.shape()
    );
    ensure_shape!(v_shape[3] >= 1, "v: value dimension must be at least 1, got shape {v_shape:?}");
    for s in seqs {
        ensure_shape!(
            s.batch < b && s.q_start + s.q_len <= sq && s.k_start + s.k_len <= sk,
            "sequence {s:?} lies outside q {:?} / k {:?}",
            q.shape(),
            k.shape()
        );
    }
    Ok(())
}

/// Work below which handing tasks to the pool costs more than it saves (a wake-up of a pool
/// thread is tens of microseconds): about 20 µs of single-threaded compute.
const SMALL_FLOPS: usize = 1 << 21;

/// Whether a call is small enough to run on the caller's thread (upper bound: every query
/// sees every key).
fn is_small(seqs: &[Sequence], hq: usize, dims: usize) -> bool {
    let flops: usize = seqs.iter().map(|s| s.q_len.saturating_mul(s.k_len)).fold(0usize, |a, b| a.saturating_add(b));
    flops.saturating_mul(hq).saturating_mul(2 * dims) < SMALL_FLOPS
}

fn tasks(seqs: &[Sequence], hkv: usize, plan: &Plan, params: &Params) -> Vec<Task> {
    let mut t = Vec::new();
    for (si, s) in seqs.iter().enumerate() {
        for kvh in 0..hkv {
            for i0 in (0..s.q_len).step_by(plan.tq) {
                t.push(Task { seq: si, kvh, i0, i1: (i0 + plan.tq).min(s.q_len) });
            }
        }
    }
    // Longest first (causal and windowed tasks differ in cost by up to N/tile): the pool then
    // ends on small tasks instead of one thread finishing a long one alone. The sort is stable,
    // so tasks of one head stay together where costs tie (dense attention), keeping its K/V
    // in cache.
    if params.causal || params.window != (None, None) {
        t.sort_by_key(|task| {
            let seq = &seqs[task.seq];
            let keys: usize = [task.i0, task.i1 - 1].iter().map(|&i| visible_len(params, seq, i)).sum();
            std::cmp::Reverse(keys)
        });
    }
    t
}

/// How many keys query `i` sees (windows and causality; sinks included).
fn visible_len(params: &Params, seq: &Sequence, i: usize) -> usize {
    let v = visible(params, seq, i);
    v.ranges().iter().map(|(a, b)| b - a).sum()
}

/// Attention of `q` over `k`/`v` for each of `seqs`, written into `out`; when `lse` is given
/// (length `B·Hq·Sq`, laid out `(B, Hq, Sq)`), also the natural log-sum-exp of each row.
///
/// Rows of `out` that belong to no sequence are left untouched. A row that sees no key gets
/// zeros and an LSE of −∞.
pub fn attention(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &mut StridedMut,
    lse: Option<&mut [f32]>,
    seqs: &[Sequence],
    params: &Params,
) -> Result<()> {
    attention_with(q, k, v, out, lse, seqs, params, &Extras::default())
}

/// [`attention`] with biases, masks, block-sparse layouts or sinks (see [`Extras`]; their
/// `(B, H, Nq, Nk)` indices are the tensors' own).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &mut StridedMut,
    lse: Option<&mut [f32]>,
    seqs: &[Sequence],
    params: &Params,
    extras: &Extras,
) -> Result<()> {
    check_inputs(q, k, v.shape(), seqs, params)?;
    extras.validate(q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2])?;
    let [b, hq, sq, _] = q.shape();
    let hkv = k.shape()[1];
    let dv = v.shape()[3];
    ensure_shape!(out.shape() == [b, hq, sq, dv], "out has shape {:?}, expected {:?}", out.shape(), [b, hq, sq, dv]);
    // Queries and output share a type, keys and values share one (a cache may hold f16 or int8
    // keys for f32 queries).
    if q.dtype() != out.dtype() || k.dtype() != v.dtype() || q.dtype() == DType::I8 {
        return Err(Error::DType(format!(
            "q and out must share a float dtype and k and v one dtype, got {}, {}, {}, {}",
            q.dtype().name(),
            k.dtype().name(),
            v.dtype().name(),
            out.dtype().name()
        )));
    }
    k.check_readable("k")?;
    v.check_readable("v")?;
    let lse = match lse {
        Some(buf) => {
            ensure_shape!(buf.len() == b * hq * sq, "lse buffer has {} entries, expected {}", buf.len(), b * hq * sq);
            Some(LsePtr(buf.as_mut_ptr()))
        }
        None => None,
    };
    let plan = Plan::new(hq / hkv, q.shape()[3], dv, seqs);
    let ctx = Ctx { q, k, v: Some(v), seqs, params, extras, plan };
    let sinks = Sinks { out: out.rows(), lse, lse_dims: [hq * sq, sq, 1] };
    let work = tasks(seqs, hkv, &plan, params);
    let isa = Isa::active();
    if is_small(seqs, hq, plan.d + dv) {
        let mut scratch = blocked::Scratch::new(&plan);
        for task in &work {
            // SAFETY: `isa` was detected on this CPU; one thread writes every row.
            unsafe { blocked::run(isa, &ctx, blocked::Job::Rows(&sinks), task, &mut scratch) };
        }
        return Ok(());
    }
    // The caller's thread works alongside the pool's (see `parallel::for_each`).
    let new_scratch = || blocked::Scratch::new(&plan);
    match split_keys(&ctx, &work, parallel::num_threads()) {
        None => {
            let order = longest_first(&ctx, &work);
            parallel::for_each(work.len(), new_scratch, |scratch, i| {
                // SAFETY: `isa` was detected on this CPU; tasks write disjoint rows.
                unsafe { blocked::run(isa, &ctx, blocked::Job::Rows(&sinks), &work[order[i]], scratch) }
            })
        }
        Some(parts) => {
            let rows = plan.group * plan.tq;
            let slot = softmax::partial_len(rows, dv);
            let mut partial = vec![0f32; parts.len() * slot];
            {
                let bufs: Vec<Mutex<&mut [f32]>> = partial.chunks_mut(slot).map(Mutex::new).collect();
                parallel::for_each(parts.len(), new_scratch, |scratch, i| {
                    let part = &parts[i];
                    // Each index is claimed once: the lock is never contended.
                    let mut buf = bufs[i].lock().unwrap_or_else(|e| e.into_inner());
                    let job = blocked::Job::Partial { buf: &mut buf[..], k0: part.k0, k1: part.k1 };
                    // SAFETY: `isa` was detected on this CPU; each part has its own buffer.
                    unsafe { blocked::run(isa, &ctx, job, &work[part.task], scratch) }
                });
            }
            // Parts of one task are consecutive: merge each task's slices into its rows.
            let mut firsts: Vec<usize> =
                (0..parts.len()).filter(|&i| i == 0 || parts[i - 1].task != parts[i].task).collect();
            firsts.push(parts.len());
            parallel::for_each(
                firsts.len() - 1,
                || (vec![0f32; dv], vec![0f32; dv]),
                |(acc, row), t| {
                    let (first, end) = (firsts[t], firsts[t + 1]);
                    let task = &work[parts[first].task];
                    let slices: Vec<&[f32]> = (first..end).map(|i| &partial[i * slot..(i + 1) * slot]).collect();
                    let seq = &seqs[task.seq];
                    let rows = plan.group * (task.i1 - task.i0);
                    for r in 0..rows {
                        let (m, l) = softmax::merge_row(&slices, rows, dv, r, acc);
                        let (h, i) = blocked::row_of(&plan, task, r);
                        let lse = softmax::finish_row(acc, m, l, row, extras.sink(h));
                        // SAFETY: each task's rows are written by this closure only.
                        unsafe { sinks.write(seq, h, seq.q_start + i, row, lse) };
                    }
                },
            );
        }
    }
    Ok(())
}

/// The softmax probabilities of `q` against `k`, written into `weights` (`(B, Hq, Sq, Sk)`,
/// C-contiguous, which the caller zero-fills: entries no query sees stay as they were).
pub fn attention_weights(
    q: &Strided,
    k: &Strided,
    weights: &mut [f32],
    seqs: &[Sequence],
    params: &Params,
) -> Result<()> {
    attention_weights_with(q, k, weights, seqs, params, &Extras::default())
}

/// [`attention_weights`] with [`Extras`].
pub fn attention_weights_with(
    q: &Strided,
    k: &Strided,
    weights: &mut [f32],
    seqs: &[Sequence],
    params: &Params,
    extras: &Extras,
) -> Result<()> {
    check_inputs(q, k, k.shape(), seqs, params)?;
    extras.validate(q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2])?;
    k.check_readable("k")?;
    let [b, hq, sq, d] = q.shape();
    let [_, hkv, sk, _] = k.shape();
    ensure_shape!(
        weights.len() == b * hq * sq * sk,
        "weights buffer has {} entries, expected {}",
        weights.len(),
        b * hq * sq * sk
    );
    let plan = Plan::new(hq / hkv, d, d, seqs);
    let ctx = Ctx { q, k, v: None, seqs, params, extras, plan };
    let dest = weights::Dest { ptr: weights.as_mut_ptr(), dims: [hq * sq * sk, sq * sk, sk] };
    let work = tasks(seqs, hkv, &plan, params);
    let isa = Isa::active();
    if is_small(seqs, hq, 2 * d) {
        let mut scratch = blocked::Scratch::new(&plan);
        for task in &work {
            // SAFETY: `isa` was detected on this CPU; one thread writes every row.
            unsafe { weights::run(isa, &ctx, &dest, task, &mut scratch) };
        }
        return Ok(());
    }
    parallel::install(|| {
        work.par_iter().for_each_init(
            || blocked::Scratch::new(&plan),
            // SAFETY: `isa` was detected on this CPU; tasks write disjoint rows.
            |scratch, task| unsafe { weights::run(isa, &ctx, &dest, task, scratch) },
        )
    });
    Ok(())
}
