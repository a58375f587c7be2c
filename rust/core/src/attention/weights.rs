//! The probability matrix itself, for inspection: two passes over the same score tiles, the
//! first for each row's max and sum, the second to write `exp(s − m) / l`.

use super::blocked::{load_queries, score_tile, Scratch};
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
    let Some((kmin, kmax)) = ctx.key_range(task) else { return };
    let plan = ctx.plan;
    let dims = load_queries::<S>(ctx, task, sc);
    let bcp = dims.bcp;
    let seq = &ctx.seqs[task.seq];
    sc.m[..dims.rows].fill(f32::NEG_INFINITY);
    sc.l[..dims.rows].fill(0.0);
    for pass in 0..2 {
        let mut k0 = kmin;
        while k0 < kmax {
            let kn = plan.bc.min(kmax - k0);
            // SAFETY: buffers sized by Scratch::new for this plan.
            unsafe { score_tile::<S>(ctx, task, sc, &dims, k0, kn) };
            for r in 0..dims.rows {
                let s = &sc.s[r * bcp..r * bcp + kn];
                if pass == 0 {
                    let mx = s.iter().fold(f32::NEG_INFINITY, |a, &b| if a > b { a } else { b });
                    if mx == f32::NEG_INFINITY {
                        continue;
                    }
                    let m_new = sc.m[r].max(mx);
                    let sum: f32 = s.iter().map(|&x| (x - m_new).exp()).sum();
                    sc.l[r] = sc.l[r] * (sc.m[r] - m_new).exp() + sum;
                    sc.m[r] = m_new;
                } else if sc.l[r] > 0.0 || sc.l[r].is_nan() {
                    let tq = task.i1 - task.i0;
                    let (g, t) = (r / tq, r % tq);
                    let h = task.kvh * plan.group + g;
                    let i = seq.q_start + task.i0 + t;
                    let at = seq.batch * dest.dims[0] + h * dest.dims[1] + i * dest.dims[2] + seq.k_start + k0;
                    let (m, inv) = (sc.m[r], 1.0 / sc.l[r]);
                    for (j, &x) in s.iter().enumerate() {
                        // SAFETY: `attention_weights` checked the buffer's size; this row is ours.
                        unsafe { *dest.ptr.add(at + j) = (x - m).exp() * inv };
                    }
                }
            }
            k0 += kn;
        }
    }
}
