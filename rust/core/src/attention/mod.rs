//! Scaled-dot-product attention over strided views: the public entry points, their argument
//! checks, and the split of a call into tasks, run on the pool through the kernel table.
//!
//! A call is planned into tasks (one sequence × one KV head × a tile of queries, holding the
//! rows of every query head of the group: see `tile`), run in parallel longest first; when a
//! decode step leaves fewer tasks than threads, their keys are split too and the partial
//! results merged (`decode`). The modules below never import each other sideways or upwards:
//!
//! ```text
//! mod      entry points, checks, planning; tasks or split-K parts, merge  → task, decode, weights, tile, output
//! task     one task: each key tile through the first step that applies   → prefill, decode, tile, output
//! prefill  the blocked step on one key tile (many rows)                   → paired, tile
//! paired   the same step on bf16 pair products                            → prefill (its P·V), tile
//! decode   the typed few-rows step; split-K and its merge                 → tile, dots, online, output
//! weights  the probability matrix, two passes                             → tile, online
//! tile     plan, scratch, queries, score tiles, masks, widening, P·V      → dots, online
//! dots     dot-product score kernels  ·  online  the online softmax  ·  output  rows and LSE out
//! ```
//!
//! (Besides, they use the crate's `simd`, `gemm`, `layout`, `mask` and `extras`.)

mod decode;
mod dots;
mod online;
mod output;
mod paired;
mod prefill;
mod task;
mod tile;
mod weights;

use crate::error::{ensure_shape, Error, Result};
use crate::extras::Extras;
use crate::layout::{check_qkv, DType, Strided, StridedMut};
use crate::mask::{visible, Params, Sequence};
use crate::parallel;
use crate::simd::Isa;
use decode::Part;
use output::{LsePtr, Output};
use rayon::prelude::*;
use std::sync::Mutex;
use task::Job;
use tile::{Ctx, Plan, Scratch, Task};

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

/// The checks every entry point makes: options, q/k/v shapes, sequences, extras.
fn check_inputs(
    q: &Strided,
    k: &Strided,
    v_shape: [usize; 4],
    seqs: &[Sequence],
    params: &Params,
    extras: &Extras,
) -> Result<()> {
    params.validate()?;
    check_qkv(q.shape(), k.shape(), v_shape)?;
    let [_, _, sq, _] = q.shape();
    let sk = k.shape()[2];
    for s in seqs {
        ensure_shape!(
            s.batch < q.shape()[0] && s.q_start + s.q_len <= sq && s.k_start + s.k_len <= sk,
            "sequence {s:?} lies outside q {:?} / k {:?}",
            q.shape(),
            k.shape()
        );
    }
    extras.validate(q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2])
}

/// The checks of [`attention_with`]: [`check_inputs`], then the output shape, dtypes,
/// readable K/V, and the LSE buffer's length.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &StridedMut,
    lse_len: Option<usize>,
    seqs: &[Sequence],
    params: &Params,
    extras: &Extras,
) -> Result<()> {
    check_inputs(q, k, v.shape(), seqs, params, extras)?;
    let [b, hq, sq, _] = q.shape();
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
    if let Some(len) = lse_len {
        ensure_shape!(len == b * hq * sq, "lse buffer has {} entries, expected {}", len, b * hq * sq);
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
    check_attention(q, k, v, out, lse.as_deref().map(<[f32]>::len), seqs, params, extras)?;
    let [_, hq, sq, d] = q.shape();
    let (hkv, dv) = (k.shape()[1], v.shape()[3]);
    let plan = Plan::new(hq / hkv, d, dv, seqs);
    let paired = paired::Paired::choose(q.dtype(), k.dtype(), params.precision, Isa::active());
    let ctx = Ctx { q, k, v: Some(v), seqs, params, extras, plan, paired };
    let lse = lse.map(|buf| LsePtr(buf.as_mut_ptr()));
    let out = Output { rows: out.rows(), lse, lse_dims: [hq * sq, sq, 1] };
    let work = tasks(seqs, hkv, &plan, params);
    let isa = Isa::active();
    if is_small(seqs, hq, d + dv) {
        run_here(isa, &ctx, &work, &out);
        return Ok(());
    }
    match decode::split_keys(&ctx, &work, parallel::num_threads()) {
        None => run_tasks(isa, &ctx, &work, &out),
        Some(parts) => {
            let partial = run_parts(isa, &ctx, &work, &parts);
            decode::merge(&ctx, &work, &parts, &partial, &out);
        }
    }
    Ok(())
}

/// Runs every task on the caller's thread (a call too small to hand to the pool).
fn run_here(isa: Isa, ctx: &Ctx, work: &[Task], out: &Output) {
    let mut sc = Scratch::new(&ctx.plan);
    for task in work {
        // SAFETY: `isa` was detected on this CPU; one thread writes every row.
        unsafe { task::run(isa, ctx, Job::Rows(out), task, &mut sc) };
    }
}

/// Runs the tasks on the pool, the longest first. The caller's thread works alongside the
/// pool's (see `parallel::for_each`).
fn run_tasks(isa: Isa, ctx: &Ctx, work: &[Task], out: &Output) {
    let order = longest_first(ctx, work);
    parallel::for_each(
        work.len(),
        || Scratch::new(&ctx.plan),
        |sc, i| {
            let task = &work[order[i]];
            // SAFETY: `isa` was detected on this CPU; tasks write disjoint rows.
            unsafe { task::run(isa, ctx, Job::Rows(out), task, sc) }
        },
    )
}

/// Runs the split-K parts on the pool; returns their partial states, one
/// `decode::part_len` slot each, in the order of `parts`.
fn run_parts(isa: Isa, ctx: &Ctx, work: &[Task], parts: &[Part]) -> Vec<f32> {
    let slot = decode::part_len(&ctx.plan);
    let mut partial = vec![0f32; parts.len() * slot];
    let bufs: Vec<Mutex<&mut [f32]>> = partial.chunks_mut(slot).map(Mutex::new).collect();
    parallel::for_each(
        parts.len(),
        || Scratch::new(&ctx.plan),
        |sc, i| {
            let Part { task, k0, k1 } = parts[i];
            // Each index is claimed once: the lock is never contended.
            let mut buf = bufs[i].lock().unwrap_or_else(|e| e.into_inner());
            let job = Job::Partial { buf: &mut buf[..], k0, k1 };
            // SAFETY: `isa` was detected on this CPU; each part has its own buffer.
            unsafe { task::run(isa, ctx, job, &work[task], sc) }
        },
    );
    drop(bufs);
    partial
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
    check_inputs(q, k, k.shape(), seqs, params, extras)?;
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
    let ctx = Ctx { q, k, v: None, seqs, params, extras, plan, paired: None };
    let dest = weights::Dest { ptr: weights.as_mut_ptr(), dims: [hq * sq * sk, sq * sk, sk] };
    let work = tasks(seqs, hkv, &plan, params);
    let isa = weights::isa(Isa::active());
    let (ctx, dest) = (&ctx, &dest);
    if is_small(seqs, hq, 2 * d) {
        let mut sc = Scratch::new(&plan);
        for task in &work {
            // SAFETY: `isa` was detected on this CPU; one thread writes every row.
            unsafe { weights::run(isa, ctx, dest, task, &mut sc) };
        }
        return Ok(());
    }
    parallel::install(|| {
        work.par_iter().for_each_init(
            || Scratch::new(&plan),
            // SAFETY: `isa` was detected on this CPU; tasks write disjoint rows.
            |sc, task| unsafe { weights::run(isa, ctx, dest, task, sc) },
        )
    });
    Ok(())
}
