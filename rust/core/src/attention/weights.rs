//! The probability matrix itself, for inspection: two passes over the same score tiles, the
//! first for each row's max and sum, the second to write `2^(s − m) / l` (scores in base 2).

use super::blocked::{load_queries, row_of, score_tile, softmax_update, Scratch};
use super::softmax::with_sink;
use super::{Ctx, Task};
use crate::simd::{scalar::Scalar, Isa, Simd};

/// `(B, Hq, Sq, Sk)` contiguous f32 destination; `dims` are the strides of batch, head, query.
pub(crate) struct Dest {
    pub ptr: *mut f32,
    pub dims: [usize; 3],
}
// SAFETY: each task writes the rows of its own queries only.
unsafe impl Sync for Dest {}
// SAFETY: as for Sync.
unsafe impl Send for Dest {}

/// # Safety
/// `isa` must be available on this CPU; no other task may write the rows of `task`.
pub(crate) unsafe fn run(isa: Isa, ctx: &Ctx, dest: &Dest, task: &Task, sc: &mut Scratch) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx2 => run_avx2(ctx, dest, task, sc),
            _ => body::<Scalar>(ctx, dest, task, sc),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(ctx: &Ctx, dest: &Dest, task: &Task, sc: &mut Scratch) {
    // SAFETY: the caller checked the ISA (AVX-512 CPUs have AVX2) and owns the rows.
    unsafe { body::<crate::simd::x86::Avx2>(ctx, dest, task, sc) }
}

#[inline(always)]
unsafe fn body<S: Simd>(ctx: &Ctx, dest: &Dest, task: &Task, sc: &mut Scratch) {
    let ranges = ctx.key_ranges(task);
    if ranges.is_empty() {
        return;
    }
    let plan = ctx.plan;
    let dims = load_queries::<S>(ctx, task, sc);
    let rows_p = dims.rows_p;
    let seq = &ctx.seqs[task.seq];
    for pass in 0..2 {
        if pass == 1 {
            // A sink takes its share of every row's probability mass.
            for r in 0..dims.rows {
                let (h, _) = row_of(&plan, task, r);
                let (m, l, _) = with_sink(sc.m[r], sc.l[r], ctx.extras.sink(h));
                (sc.m[r], sc.l[r]) = (m, l);
            }
        }
        for &(kmin, kmax) in &ranges {
            ctx.extras.scan(&sc.at[..dims.rows], kmin, kmax, plan.bc, &mut sc.facts);
            let mut k0 = kmin;
            while k0 < kmax {
                let kn = plan.bc.min(kmax - k0);
                if ctx.extras.masks() && !ctx.extras.tile_live(&sc.at[..dims.rows], k0, kn, sc.facts.tile(k0)) {
                    k0 += kn;
                    continue;
                }
                // SAFETY: buffers sized by Scratch::new for this plan.
                unsafe { score_tile::<S>(ctx, task, sc, &dims, k0, kn) };
                if pass == 0 {
                    // SAFETY: as above.
                    unsafe { softmax_update::<S>(sc, &dims, kn) };
                } else {
                    for r in 0..dims.rows {
                        let l = sc.l[r];
                        if !(l > 0.0 || l.is_nan()) {
                            continue;
                        }
                        let (h, i) = row_of(&plan, task, r);
                        let at = seq.batch * dest.dims[0]
                            + h * dest.dims[1]
                            + (seq.q_start + i) * dest.dims[2]
                            + seq.k_start
                            + k0;
                        let (m, inv) = (sc.m[r], 1.0 / l);
                        for j in 0..kn {
                            let p = (sc.st[j * rows_p + r] - m).exp2() * inv;
                            // SAFETY: `attention_weights` checked the buffer's size; this row is ours.
                            unsafe { *dest.ptr.add(at + j) = p };
                        }
                    }
                }
                k0 += kn;
            }
        }
    }
}
