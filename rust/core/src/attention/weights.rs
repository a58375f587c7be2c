//! The probability matrix itself, for inspection: two passes over the same score tiles, the
//! first for each row's max and sum, the second to write `2^(s − m) / l` (scores in base 2).

use super::online::with_sink;
use super::tile::{load_queries, row_of, score_tile, tile_is_dead, Ctx, Scratch, Task};
use crate::memory::Alloc;
use crate::simd::{kernel_entry, Isa, Simd};

/// `(B, Hq, Sq, Sk)` contiguous f32 destination; `dims` are the strides of batch, head, query.
pub(crate) struct Dest {
    pub ptr: *mut f32,
    pub dims: [usize; 3],
}
// SAFETY: each task writes the rows of its own queries only.
unsafe impl Sync for Dest {}
// SAFETY: as for Sync.
unsafe impl Send for Dest {}

/// The ISA the weights of a call run on: AVX-512 CPUs run the AVX2 body, as they have since
/// this kernel was written (a 16-lane body was never measured for it).
pub(crate) fn isa(active: Isa) -> Isa {
    match active {
        Isa::Avx512 => Isa::Avx2,
        other => other,
    }
}

kernel_entry! {
    /// Writes the weights of one task's rows on the kernel of `isa` (see [`isa`]).
    ///
    /// # Safety
    /// `isa` must be available on this CPU, no other task may write the rows of `task`, and
    /// the scratch must be made for the plan of `ctx`.
    pub(crate) unsafe fn run(ctx: &Ctx, dest: &Dest, task: &Task, sc: &mut Scratch) -> Alloc<()> => body
}

/// Writes the weights of `task`'s rows: a first pass for each row's max and sum, a second to
/// write the probabilities. Fails only when a tile of keys to widen cannot be allocated.
///
/// # Safety
/// As for [`run`], with `S` available.
#[inline(always)]
unsafe fn body<S: Simd>(ctx: &Ctx, dest: &Dest, task: &Task, sc: &mut Scratch) -> Alloc<()> {
    let ranges = ctx.key_ranges(task);
    if ranges.is_empty() {
        return Ok(());
    }
    let plan = ctx.plan;
    let dims = load_queries::<S>(ctx, task, sc);
    sc.soft.start(dims.rows_p, 0);
    let rows_p = dims.rows_p;
    let seq = &ctx.seqs[task.seq];
    for pass in 0..2 {
        if pass == 1 {
            // A sink takes its share of every row's probability mass.
            for r in 0..dims.rows {
                let (h, _) = row_of(&plan, task, r);
                let (m, l, _) = with_sink(sc.soft.m[r], sc.soft.l[r], ctx.variants.sink(h));
                (sc.soft.m[r], sc.soft.l[r]) = (m, l);
            }
        }
        for &(kmin, kmax) in &ranges {
            ctx.variants.scan(&sc.q.at[..dims.rows], kmin, kmax, plan.bc, &mut sc.s.facts);
            let mut k0 = kmin;
            while k0 < kmax {
                let kn = plan.bc.min(kmax - k0);
                if tile_is_dead(ctx, sc, &dims, k0, kn) {
                    k0 += kn;
                    continue;
                }
                // SAFETY: buffers sized by Scratch::new for this plan.
                unsafe { score_tile::<S>(ctx, task, sc, &dims, k0, kn)? };
                if pass == 0 {
                    // SAFETY: as above.
                    unsafe { sc.soft.update_cols::<S>(&mut sc.s.st, rows_p, dims.cols, kn) };
                } else {
                    for r in 0..dims.rows {
                        let l = sc.soft.l[r];
                        if !(l > 0.0 || l.is_nan()) {
                            continue;
                        }
                        let (h, i) = row_of(&plan, task, r);
                        let at = seq.batch * dest.dims[0]
                            + h * dest.dims[1]
                            + (seq.q_start + i) * dest.dims[2]
                            + seq.k_start
                            + k0;
                        let (m, inv) = (sc.soft.m[r], 1.0 / l);
                        for j in 0..kn {
                            let p = (sc.s.st[j * rows_p + r] - m).exp2() * inv;
                            // SAFETY: `attention_weights` checked the buffer's size; this row is ours.
                            unsafe { *dest.ptr.add(at + j) = p };
                        }
                    }
                }
                k0 += kn;
            }
        }
    }
    Ok(())
}
