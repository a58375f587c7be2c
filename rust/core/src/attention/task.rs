//! One attention task from start to end: its queries packed, every key tile its rows can see
//! folded into their online softmax, then its rows finished (or its partial state saved, for
//! split-K).
//!
//! Each key tile takes the first step that applies: a tile no row may see is skipped; a few
//! rows that see the whole tile take the typed path, reading K and V in their storage type
//! (`decode`); everything else takes the blocked step (`prefill`). Both steps leave the same
//! state behind, so a task may mix them (a decode step's fully visible tiles and its partly
//! masked last one).

use super::decode;
use super::output::Output;
use super::paired;
use super::prefill;
use super::tile::{load_queries, prefetch_of, row_of, tile_is_dead, Ctx, Dims, Scratch, Task};
use crate::memory::Alloc;
use crate::simd::{kernel_entry, Simd};

/// What a task produces: its output rows, or the partial state of one slice of its keys.
pub(crate) enum Job<'a> {
    Rows(&'a Output<'a>),
    /// Keys `k0..k1` only; `buf` receives the state laid out as `online::Online::save` writes it.
    Partial {
        buf: &'a mut [f32],
        k0: usize,
        k1: usize,
    },
}

kernel_entry! {
    /// Runs one task on the kernel of `isa`; fails only when a tile to widen cannot be
    /// allocated (its rows are then left unfinished).
    ///
    /// # Safety
    /// `isa` must be available on this CPU, no other task may write the rows of `task` (or
    /// `job`'s buffer), and the scratch must be made for the plan of `ctx`.
    pub(crate) unsafe fn run(ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) -> Alloc<()> => body
}

/// See [`run`].
///
/// # Safety
/// As for [`run`], with `S` available.
#[inline(always)]
unsafe fn body<S: Simd>(ctx: &Ctx, job: Job, task: &Task, sc: &mut Scratch) -> Alloc<()> {
    let dims = load_queries::<S>(ctx, task, sc);
    sc.soft.start(dims.rows_p, dims.rows_p * dims.dvp);
    let (j0, j1) = match job {
        Job::Rows(_) => (0, usize::MAX),
        Job::Partial { k0, k1, .. } => (k0, k1),
    };
    for (lo, hi) in ctx.key_ranges(task) {
        let (lo, hi) = (lo.max(j0), hi.min(j1));
        if lo < hi {
            // SAFETY: `S` is available (the caller's promise); scratch sized for the plan.
            unsafe { accumulate::<S>(ctx, task, sc, &dims, lo, hi)? };
        }
    }
    match job {
        Job::Rows(out) => write_rows(ctx, out, task, sc, &dims),
        Job::Partial { buf, .. } => sc.soft.save(buf, dims.rows, ctx.plan.dv, dims.dvp),
    }
    Ok(())
}

/// Runs the online softmax of the task's rows over keys `kmin..kmax`, a tile at a time.
///
/// # Safety
/// `S` is available; the scratch is sized for the plan; `kmin..kmax` are keys the task sees.
#[inline(always)]
unsafe fn accumulate<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    kmin: usize,
    kmax: usize,
) -> Alloc<()> {
    let bc = ctx.plan.bc;
    ctx.variants.scan(&sc.q.at[..dims.rows], kmin, kmax, bc, &mut sc.s.facts);
    let step = decode::keys_per_step::<S>(ctx, sc, dims, kmin, kmax);
    let seq = &ctx.seqs[task.seq];
    let k_start = seq.k_start;
    // On paged K/V the steps request nothing ahead (their rows ahead lie in other blocks):
    // keys up to a stream's distance past each tile are requested here, block by block.
    let ahead = match ctx.paged() {
        true => prefetch_of(ctx.k.typed_rows(seq.batch, task.kvh, k_start + kmin), ctx.plan.d).lead(),
        false => 0,
    };
    let mut requested = kmin;
    let mut k0 = kmin;
    while k0 < kmax {
        // Tiles are `bc` keys from `kmin` (the dense terms' facts are per such tile), cut at
        // a block's end on paged keys and values: the steps walk a tile's rows from one
        // pointer.
        let run = ctx.run_len(k_start + k0);
        let kn = (kmax.min(k0 - (k0 - kmin) % bc + bc) - k0).min(run);
        if tile_is_dead(ctx, sc, dims, k0, kn) {
            k0 += kn;
            continue;
        }
        let wide = if step > bc { step.min(kmax - k0).min(run) } else { kn };
        if ahead > 0 {
            let to = kmax.min(k0 + wide + ahead);
            if requested < to {
                ctx.request_keys(task, requested.max(k0), to);
                requested = to;
            }
        }
        // SAFETY: forwarded (both steps).
        if unsafe { decode::typed_tile::<S>(ctx, task, sc, dims, k0, wide) } {
            k0 += wide;
            continue;
        }
        // Where the CPU multiplies bf16 pairs, the same step on them (see `paired`); it
        // declines tiles it does not apply to.
        let paired = match ctx.paired {
            // SAFETY: as above; `mode` was chosen for this call's types.
            Some(mode) => unsafe { paired::tile::<S>(ctx, task, sc, dims, k0, kn, mode)? },
            None => false,
        };
        if !paired {
            // SAFETY: as above.
            unsafe { prefill::tile::<S>(ctx, task, sc, dims, k0, kn)? };
        }
        k0 += kn;
    }
    Ok(())
}

/// Normalizes the task's rows and writes them (and their LSE) out.
fn write_rows(ctx: &Ctx, out: &Output, task: &Task, sc: &mut Scratch, dims: &Dims) {
    let (dv, dvp) = (ctx.plan.dv, dims.dvp);
    let seq = &ctx.seqs[task.seq];
    for r in 0..dims.rows {
        let (h, i) = row_of(&ctx.plan, task, r);
        let lse = sc.soft.finish(r, dv, dvp, &mut sc.row[..dv], ctx.variants.sink(h));
        // SAFETY: this task is the only writer of its rows.
        unsafe { out.write(seq, h, seq.q_start + i, &sc.row[..dv], lse) };
    }
}
