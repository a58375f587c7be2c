//! The prefill kernel: one task = a tile of query rows against every key tile they can see,
//! with an online softmax (running max `m`, running sum `l`) so the score matrix never exists
//! beyond one `rows × keys` tile.

use super::gemm::{gemm, MR};
use super::{Ctx, Plan, Sinks, Task};
use crate::mask::visible;
use crate::simd::{scalar::Scalar, Isa, Simd};

/// Widest `2·LANES` of any ISA: padding to it fits every path.
const MAX_NR: usize = 32;

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// Per-worker buffers, reused across tasks.
pub(crate) struct Scratch {
    /// Query rows, scaled: `rows_p × d`.
    pub q: Vec<f32>,
    /// Key tile, transposed: `d × bcp`.
    pub kt: Vec<f32>,
    /// Value tile: `bc × dvp`.
    pub v: Vec<f32>,
    /// Scores, then probabilities: `rows_p × bcp`.
    pub s: Vec<f32>,
    /// Unnormalized output: `rows_p × dvp`.
    pub acc: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// Visible key range of each row, relative to the sequence.
    pub lo: Vec<usize>,
    pub hi: Vec<usize>,
    /// One converted input row.
    pub row: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(plan: &Plan) -> Scratch {
        let rows_p = round_up(plan.group * plan.tq, MR);
        let bcp = round_up(plan.bc, MAX_NR);
        let dvp = round_up(plan.dv, MAX_NR);
        Scratch {
            q: vec![0.0; rows_p * plan.d],
            kt: vec![0.0; plan.d * bcp],
            v: vec![0.0; plan.bc * dvp],
            s: vec![0.0; rows_p * bcp],
            acc: vec![0.0; rows_p * dvp],
            m: vec![0.0; rows_p],
            l: vec![0.0; rows_p],
            lo: vec![0; rows_p],
            hi: vec![0; rows_p],
            row: vec![0.0; plan.d.max(plan.dv)],
        }
    }
}

/// Padded sizes for one ISA.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub rows: usize,
    pub rows_p: usize,
    pub bcp: usize,
    pub dvp: usize,
}

impl Dims {
    #[inline(always)]
    pub(crate) fn new<S: Simd>(plan: &Plan, task: &Task) -> Dims {
        let rows = plan.group * (task.i1 - task.i0);
        let nr = 2 * S::LANES;
        Dims { rows, rows_p: round_up(rows, MR), bcp: round_up(plan.bc, nr), dvp: round_up(plan.dv, nr) }
    }
}

/// Runs one task on the kernel of `isa`.
///
/// # Safety
/// `isa` must be available on this CPU, and no other task may write the rows of `task`.
pub(crate) unsafe fn run(isa: Isa, ctx: &Ctx, sinks: &Sinks, task: &Task, sc: &mut Scratch) {
    // SAFETY: forwarded from the caller; each entry point needs only its ISA.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_avx512(ctx, sinks, task, sc),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_avx2(ctx, sinks, task, sc),
            _ => task_body::<Scalar>(ctx, sinks, task, sc),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn run_avx2(ctx: &Ctx, sinks: &Sinks, task: &Task, sc: &mut Scratch) {
    // SAFETY: the caller checked the ISA and owns the task's rows.
    unsafe { task_body::<crate::simd::x86::Avx2>(ctx, sinks, task, sc) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn run_avx512(ctx: &Ctx, sinks: &Sinks, task: &Task, sc: &mut Scratch) {
    // SAFETY: the caller checked the ISA and owns the task's rows.
    unsafe { task_body::<crate::simd::x86::Avx512>(ctx, sinks, task, sc) }
}

/// Loads the task's query rows (scaled) and their visible ranges; returns the padded sizes.
#[inline(always)]
pub(crate) fn load_queries<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch) -> Dims {
    let plan = &ctx.plan;
    let dims = Dims::new::<S>(plan, task);
    let seq = &ctx.seqs[task.seq];
    let tq = task.i1 - task.i0;
    let d = plan.d;
    for g in 0..plan.group {
        let h = task.kvh * plan.group + g;
        for t in 0..tq {
            let r = g * tq + t;
            let i = task.i0 + t;
            ctx.q.read_row(seq.batch, h, seq.q_start + i, &mut sc.q[r * d..(r + 1) * d], ctx.params.scale);
            let (lo, hi) = visible(ctx.params, seq, i);
            sc.lo[r] = lo;
            sc.hi[r] = hi;
        }
    }
    for r in dims.rows..dims.rows_p {
        sc.q[r * d..(r + 1) * d].fill(0.0);
        sc.lo[r] = 0;
        sc.hi[r] = 0;
    }
    dims
}

/// Scores of the task's rows against keys `k0..k0 + kn` into `sc.s`: softcapped, and −∞ where
/// a row may not look (padding rows: all −∞).
#[inline(always)]
pub(crate) unsafe fn score_tile<S: Simd>(ctx: &Ctx, task: &Task, sc: &mut Scratch, dims: &Dims, k0: usize, kn: usize) {
    let plan = &ctx.plan;
    let seq = &ctx.seqs[task.seq];
    let (d, bcp) = (plan.d, dims.bcp);
    for j in 0..kn {
        ctx.k.read_row(seq.batch, task.kvh, seq.k_start + k0 + j, &mut sc.row, 1.0);
        for (dd, &x) in sc.row[..d].iter().enumerate() {
            sc.kt[dd * bcp + j] = x;
        }
    }
    // SAFETY: q holds rows_p × d, kt d × bcp, s rows_p × bcp; rows_p is a multiple of MR and
    // bcp of 2·LANES by construction.
    unsafe { gemm::<S>(sc.q.as_ptr(), d, sc.kt.as_ptr(), bcp, sc.s.as_mut_ptr(), bcp, dims.rows_p, bcp, d, false) };
    for r in 0..dims.rows_p {
        let row = &mut sc.s[r * bcp..(r + 1) * bcp];
        let a = sc.lo[r].clamp(k0, k0 + kn) - k0;
        let b = sc.hi[r].clamp(k0, k0 + kn) - k0;
        if a >= b {
            row.fill(f32::NEG_INFINITY);
            continue;
        }
        if let Some(c) = ctx.params.softcap {
            let inv = 1.0 / c;
            row[a..b].iter_mut().for_each(|x| *x = c * (*x * inv).tanh());
        }
        row[..a].fill(f32::NEG_INFINITY);
        row[b..].fill(f32::NEG_INFINITY);
    }
}

#[inline(always)]
unsafe fn task_body<S: Simd>(ctx: &Ctx, sinks: &Sinks, task: &Task, sc: &mut Scratch) {
    let plan = ctx.plan;
    let dims = load_queries::<S>(ctx, task, sc);
    let (bcp, dvp, dv) = (dims.bcp, dims.dvp, plan.dv);
    let seq = &ctx.seqs[task.seq];
    let v_view = ctx.v.expect("attention has values");
    sc.m[..dims.rows_p].fill(f32::NEG_INFINITY);
    sc.l[..dims.rows_p].fill(0.0);
    sc.acc[..dims.rows_p * dvp].fill(0.0);

    if let Some((kmin, kmax)) = ctx.key_range(task) {
        let mut k0 = kmin;
        while k0 < kmax {
            let kn = plan.bc.min(kmax - k0);
            // SAFETY: buffers sized by Scratch::new for this plan.
            unsafe { score_tile::<S>(ctx, task, sc, &dims, k0, kn) };
            let mut v_finite = true;
            for j in 0..kn {
                let dst = &mut sc.v[j * dvp..j * dvp + dv];
                v_view.read_row(seq.batch, task.kvh, seq.k_start + k0 + j, dst, 1.0);
                v_finite &= dst.iter().all(|x| x.is_finite());
            }
            for r in 0..dims.rows_p {
                // SAFETY: row r of s has bcp entries; acc row r has dvp.
                unsafe { softmax_update::<S>(sc, r, bcp, dvp) };
            }
            if v_finite {
                // SAFETY: s rows_p × bcp, v kn × dvp, acc rows_p × dvp; dvp is a multiple of
                // 2·LANES and rows_p of MR.
                unsafe {
                    gemm::<S>(sc.s.as_ptr(), bcp, sc.v.as_ptr(), dvp, sc.acc.as_mut_ptr(), dvp, dims.rows_p, dvp, kn, true)
                };
            } else {
                // A NaN or ∞ in a value row must reach only the queries that see it:
                // 0·NaN would leak into every row, so skip the zero probabilities.
                for r in 0..dims.rows_p {
                    for j in 0..kn {
                        let p = sc.s[r * bcp + j];
                        if p != 0.0 {
                            for c in 0..dv {
                                sc.acc[r * dvp + c] += p * sc.v[j * dvp + c];
                            }
                        }
                    }
                }
            }
            k0 += kn;
        }
    }

    let tq = task.i1 - task.i0;
    for g in 0..plan.group {
        let h = task.kvh * plan.group + g;
        for t in 0..tq {
            let r = g * tq + t;
            let i = seq.q_start + task.i0 + t;
            let l = sc.l[r];
            let out = &mut sc.row[..dv];
            let lse = if l > 0.0 || l.is_nan() {
                let inv = 1.0 / l;
                for (o, &a) in out.iter_mut().zip(&sc.acc[r * dvp..r * dvp + dv]) {
                    *o = a * inv;
                }
                sc.m[r] + l.ln()
            } else {
                out.fill(0.0);
                f32::NEG_INFINITY
            };
            // SAFETY: this task is the only writer of its rows.
            unsafe { sinks.out.write_row(seq.batch, h, i, out) };
            if let Some(ptr) = sinks.lse {
                let at = seq.batch * sinks.lse_dims[0] + h * sinks.lse_dims[1] + i * sinks.lse_dims[2];
                // SAFETY: `attention` checked the buffer holds B·Hq·Sq entries; the row is ours.
                unsafe { *ptr.0.add(at) = lse };
            }
        }
    }
}

/// Folds row `r` of the score tile into the running max/sum, turning it into probabilities
/// (relative to the new max) and rescaling the row's accumulator when the max moved.
#[inline(always)]
unsafe fn softmax_update<S: Simd>(sc: &mut Scratch, r: usize, bcp: usize, dvp: usize) {
    let l = S::LANES;
    let srow = sc.s[r * bcp..(r + 1) * bcp].as_mut_ptr();
    // SAFETY: bcp is a multiple of LANES and srow holds bcp floats.
    unsafe {
        let mut mx = S::splat(f32::NEG_INFINITY);
        for j in (0..bcp).step_by(l) {
            mx = S::max(mx, S::load(srow.add(j)));
        }
        let tile_max = S::reduce_max(mx);
        if tile_max == f32::NEG_INFINITY {
            // Nothing visible in this tile: probabilities 0, state unchanged.
            for j in (0..bcp).step_by(l) {
                S::store(srow.add(j), S::zero());
            }
            return;
        }
        let m_old = sc.m[r];
        let m_new = if m_old > tile_max { m_old } else { tile_max };
        let mv = S::splat(m_new);
        let mut sum = S::zero();
        for j in (0..bcp).step_by(l) {
            let p = S::exp(S::sub(S::load(srow.add(j)), mv));
            S::store(srow.add(j), p);
            sum = S::add(sum, p);
        }
        let alpha = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp() };
        sc.l[r] = sc.l[r] * alpha + S::reduce_sum(sum);
        sc.m[r] = m_new;
        if alpha != 1.0 {
            let av = S::splat(alpha);
            let arow = sc.acc[r * dvp..(r + 1) * dvp].as_mut_ptr();
            for c in (0..dvp).step_by(l) {
                S::store(arow.add(c), S::mul(S::load(arow.add(c)), av));
            }
        }
    }
}
