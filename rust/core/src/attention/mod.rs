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
//! prefill  the blocked step on one key tile (many rows)                   → tile
//! paired   the same step on bf16 pair products                            → prefill (its P·V), tile
//! decode   the typed few-rows step; split-K and its merge                 → tile, dots, online, output
//! weights  the probability matrix, two passes                             → tile, online
//! tile     plan, scratch, queries, score tiles, masks, widening, P·V      → dots, online
//! dots     dot-product score kernels  ·  online  the online softmax  ·  output  rows and LSE out
//! ```
//!
//! (Besides, they use the crate's `simd`, `gemm`, `layout`, `mask` and `variants`.)

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
use crate::layout::{check_qkv, DType, Strided, StridedMut};
use crate::mask::{visible, Params, Sequence};
use crate::memory::{mul, product, with_capacity, zeroed, Alloc, NoMemory};
use crate::parallel;
use crate::simd::Isa;
use crate::variants::Variants;
use decode::Part;
use output::{LsePtr, Output};
use rayon::prelude::*;
use std::sync::Mutex;
use task::Job;
use tile::{Ctx, Plan, Scratch, Task};

/// What the refusals of working memory name: the arguments whose sizes ask for it.
const ATTENTION_MEMORY: &str = "q, k and v (the kernels' working memory)";
const WEIGHTS_MEMORY: &str = "q and k (the kernels' working memory)";

/// Bytes of working memory each thread of an [`attention`] or [`attention_weights`] call
/// allocates for queries `(B, Hq, Nq, D)`, `hkv` key/value heads and values `dv` wide (`D` for
/// the weights), besides tiles of keys or values it widens to f32 (`None`: more than a 64-bit
/// size holds).
///
/// The calls refuse working memory they cannot allocate themselves (`Error::Memory`); this is
/// for a caller that must refuse before it has made views of its arrays.
pub fn attention_scratch_bytes(q: [usize; 4], hkv: usize, dv: usize) -> Option<usize> {
    let [_, hq, nq, d] = q;
    Scratch::bytes(&Plan::for_queries(hq.checked_div(hkv).unwrap_or(0), d, dv, nq))
}

/// Task indices, the most rows × visible keys first (ties in their order): claimed that way,
/// the long tasks of a causal prefill start first and the short ones fill in at the end,
/// instead of a long one left to run alone.
fn longest_first(ctx: &Ctx, work: &[Task]) -> Alloc<Vec<usize>> {
    let mut cost = with_capacity(work.len())?;
    cost.extend(work.iter().map(|t| {
        let keys = ctx.key_ranges(t).iter().map(|(a, b)| b - a).fold(0usize, usize::saturating_add);
        (t.i1 - t.i0).saturating_mul(keys)
    }));
    let mut order = with_capacity(work.len())?;
    order.extend(0..work.len());
    // Unique keys (the index breaks ties), so the in-place sort keeps ties in order as a
    // stable one would, without the buffer a stable sort allocates.
    order.sort_unstable_by_key(|&i| (std::cmp::Reverse(cost[i]), i));
    Ok(order)
}

/// The checks every entry point makes: options, q/k/v shapes, sequences, variants.
fn check_inputs(
    q: &Strided,
    k: &Strided,
    v_shape: [usize; 4],
    seqs: &[Sequence],
    params: &Params,
    variants: &Variants,
) -> Result<()> {
    params.validate()?;
    check_qkv(q.shape(), k.shape(), v_shape)?;
    ensure_shape!(!q.is_paged(), "q: queries are never paged (only keys and values are)");
    let [_, _, sq, _] = q.shape();
    let sk = k.shape()[2];
    for s in seqs {
        ensure_shape!(
            s.batch < q.shape()[0] && s.q_start + s.q_len <= sq && s.k_start + s.k_len <= sk,
            "sequence {s:?} lies outside q {:?} / k {:?}",
            q.shape(),
            k.shape()
        );
        k.check_rows(s.batch, s.k_start, s.k_start + s.k_len)?;
    }
    variants.validate(q.shape()[0], q.shape()[1], q.shape()[2], k.shape()[2])
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
    variants: &Variants,
) -> Result<()> {
    check_inputs(q, k, v.shape(), seqs, params, variants)?;
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
    for s in seqs {
        v.check_rows(s.batch, s.k_start, s.k_start + s.k_len)?;
    }
    if let Some(len) = lse_len {
        let rows = product("q (its log-sum-exp)", &[("B", b), ("Hq", hq), ("Nq", sq)])?;
        ensure_shape!(len == rows, "lse buffer has {} entries, expected {}", len, rows);
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

/// The tasks of a call: per sequence, KV head and tile of queries, in that order, then (with
/// causality or a window) the longest first.
fn tasks(seqs: &[Sequence], hkv: usize, plan: &Plan, params: &Params) -> Alloc<Vec<Task>> {
    let count = seqs
        .iter()
        .try_fold(0usize, |n, s| n.checked_add(mul(hkv, s.q_len.div_ceil(plan.tq))?).ok_or(NoMemory { bytes: None }))?;
    let mut t = with_capacity(count)?;
    for (si, s) in seqs.iter().enumerate() {
        for kvh in 0..hkv {
            for i0 in (0..s.q_len).step_by(plan.tq) {
                t.push(Task { seq: si, kvh, i0, i1: (i0 + plan.tq).min(s.q_len) });
            }
        }
    }
    // Longest first (causal and windowed tasks differ in cost by up to N/tile): the pool then
    // ends on small tasks instead of one thread finishing a long one alone. Ties keep the
    // order above (the in-place sort's key ends with it, as a stable sort would keep it
    // without allocating), so tasks of one head stay together where costs tie (dense
    // attention), keeping its K/V in cache.
    if params.causal || params.window != (None, None) {
        t.sort_unstable_by_key(|task| {
            let seq = &seqs[task.seq];
            let keys =
                [task.i0, task.i1 - 1].iter().map(|&i| visible_len(params, seq, i)).fold(0, usize::saturating_add);
            (std::cmp::Reverse(keys), task.seq, task.kvh, task.i0)
        });
    }
    Ok(t)
}

/// How many keys query `i` sees (windows and causality; sinks included).
fn visible_len(params: &Params, seq: &Sequence, i: usize) -> usize {
    let v = visible(params, seq, i);
    v.ranges().iter().map(|(a, b)| b - a).fold(0, usize::saturating_add)
}

/// Attention of `q` over `k`/`v` for each of `seqs`, written into `out`; when `lse` is given
/// (length `B·Hq·Sq`, laid out `(B, Hq, Sq)`), also the natural log-sum-exp of each row.
///
/// Rows of `out` that belong to no sequence are left untouched. A row that sees no key gets
/// zeros and an LSE of −∞. Zero query heads (with any number of key/value heads, none
/// included) leave nothing to compute; working memory that cannot be allocated is an
/// `Error::Memory`.
pub fn attention(
    q: &Strided,
    k: &Strided,
    v: &Strided,
    out: &mut StridedMut,
    lse: Option<&mut [f32]>,
    seqs: &[Sequence],
    params: &Params,
) -> Result<()> {
    attention_with(q, k, v, out, lse, seqs, params, &Variants::default())
}

/// [`attention`] with biases, masks, block-sparse layouts or sinks (see [`Variants`]; their
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
    variants: &Variants,
) -> Result<()> {
    check_attention(q, k, v, out, lse.as_deref().map(<[f32]>::len), seqs, params, variants)?;
    let [_, hq, sq, d] = q.shape();
    let (hkv, dv) = (k.shape()[1], v.shape()[3]);
    if hq == 0 || seqs.is_empty() {
        return Ok(());
    }
    let plan = Plan::new(hq / hkv, d, dv, seqs);
    let paired = tile::Paired::choose(q.dtype(), k.dtype(), params.precision, Isa::active());
    let ctx = Ctx { q, k, v: Some(v), seqs, params, variants, plan, paired };
    let lse = lse.map(|buf| LsePtr(buf.as_mut_ptr()));
    let lse_dims = [product("q (its log-sum-exp)", &[("Hq", hq), ("Nq", sq)])?, sq, 1];
    let out = Output { rows: out.rows(), lse, lse_dims };
    run_attention(&ctx, &out, is_small(seqs, hq, d + dv)).map_err(|e| e.named(ATTENTION_MEMORY))
}

/// Plans the tasks of a checked call and runs them: on the caller's thread when `small`, else
/// on the pool, with the keys of too few tasks split (`decode`).
fn run_attention(ctx: &Ctx, out: &Output, small: bool) -> Alloc<()> {
    let work = tasks(ctx.seqs, ctx.k.shape()[1], &ctx.plan, ctx.params)?;
    let isa = Isa::active();
    if small {
        return run_here(isa, ctx, &work, out);
    }
    match decode::split_keys(ctx, &work, parallel::num_threads()) {
        None => run_tasks(isa, ctx, &work, out),
        Some(parts) => {
            let partial = run_parts(isa, ctx, &work, &parts)?;
            decode::merge(ctx, &work, &parts, &partial, out)
        }
    }
}

/// Runs every task on the caller's thread (a call too small to hand to the pool).
fn run_here(isa: Isa, ctx: &Ctx, work: &[Task], out: &Output) -> Alloc<()> {
    let mut sc = Scratch::new(&ctx.plan)?;
    for task in work {
        // SAFETY: `isa` was detected on this CPU; one thread writes every row.
        unsafe { task::run(isa, ctx, Job::Rows(out), task, &mut sc)? };
    }
    Ok(())
}

/// Runs the tasks on the pool, the longest first. The caller's thread works alongside the
/// pool's (see `parallel::for_each`).
fn run_tasks(isa: Isa, ctx: &Ctx, work: &[Task], out: &Output) -> Alloc<()> {
    let order = longest_first(ctx, work)?;
    parallel::try_for_each(
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
fn run_parts(isa: Isa, ctx: &Ctx, work: &[Task], parts: &[Part]) -> Alloc<Vec<f32>> {
    let slot = decode::part_len(&ctx.plan)?;
    let mut partial = zeroed(mul(parts.len(), slot)?)?;
    let mut bufs: Vec<Mutex<&mut [f32]>> = with_capacity(parts.len())?;
    bufs.extend(partial.chunks_mut(slot).map(Mutex::new));
    parallel::try_for_each(
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
    )?;
    drop(bufs);
    Ok(partial)
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
    attention_weights_with(q, k, weights, seqs, params, &Variants::default())
}

/// [`attention_weights`] with [`Variants`].
pub fn attention_weights_with(
    q: &Strided,
    k: &Strided,
    weights: &mut [f32],
    seqs: &[Sequence],
    params: &Params,
    variants: &Variants,
) -> Result<()> {
    check_inputs(q, k, k.shape(), seqs, params, variants)?;
    k.check_readable("k")?;
    ensure_shape!(!k.is_paged(), "k: attention weights do not read paged keys");
    let [b, hq, sq, d] = q.shape();
    let [_, hkv, sk, _] = k.shape();
    let total = product("q and k (their attention weights)", &[("B", b), ("Hq", hq), ("Nq", sq), ("Nk", sk)])?;
    ensure_shape!(weights.len() == total, "weights buffer has {} entries, expected {}", weights.len(), total);
    if hq == 0 || seqs.is_empty() {
        return Ok(());
    }
    // Each at most `total` (B ≥ 1 where there are sequences).
    let dims = [hq * sq * sk, sq * sk, sk];
    let plan = Plan::new(hq / hkv, d, d, seqs);
    let ctx = Ctx { q, k, v: None, seqs, params, variants, plan, paired: None };
    let dest = weights::Dest { ptr: weights.as_mut_ptr(), dims };
    run_weights(&ctx, &dest, is_small(seqs, hq, 2 * d)).map_err(|e| e.named(WEIGHTS_MEMORY))
}

/// Plans the tasks of a checked weights call and runs them, on the caller's thread when
/// `small`, else on the pool.
fn run_weights(ctx: &Ctx, dest: &weights::Dest, small: bool) -> Alloc<()> {
    let work = tasks(ctx.seqs, ctx.k.shape()[1], &ctx.plan, ctx.params)?;
    let isa = weights::isa(Isa::active());
    if small {
        let mut sc = Scratch::new(&ctx.plan)?;
        for task in &work {
            // SAFETY: `isa` was detected on this CPU; one thread writes every row.
            unsafe { weights::run(isa, ctx, dest, task, &mut sc)? };
        }
        return Ok(());
    }
    parallel::install(|| {
        work.par_iter().try_for_each_init(
            || Scratch::new(&ctx.plan),
            |sc, task| {
                let sc = sc.as_mut().map_err(|e| *e)?;
                // SAFETY: `isa` was detected on this CPU; tasks write disjoint rows.
                unsafe { weights::run(isa, ctx, dest, task, sc) }
            },
        )
    })
}
