//! The few-rows path (decoding): keys and values read once, straight from their storage type.
//!
//! With one or a few query tokens, each K/V element feeds only the handful of query heads of
//! its group, so the work is bound by reading K and V. This path reads the rows in place —
//! f32, f16, bf16 or int8 — and widens them in registers: no tile is converted into a buffer.
//! int8 scales are per row, so they multiply a key's scores after the dot products and a
//! value's probabilities before P·V.

use super::blocked::{mask_tile, rescale_acc, scores_few, softmax_update, Dims, Scratch};
use super::gemm::gemm;
use super::{Ctx, Task};
use crate::layout::TypedRows;
use crate::simd::{elem::Elem, Prefetch, Simd};
use half::{bf16, f16};

/// Runs keys `k0..k0 + kn` of `task` through the typed path when it applies (few rows, every
/// row sees the whole tile, the value width a multiple of the vector pair); returns false
/// otherwise, leaving everything untouched.
///
/// # Safety
/// The scratch is sized for the plan; the views were validated.
#[inline(always)]
pub(crate) unsafe fn tile<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
) -> bool {
    let plan = ctx.plan;
    if dims.rows > 8 || dims.rows * 2 > dims.rows_p || plan.dv != dims.dvp || ctx.extras.masks() {
        return false;
    }
    // A partly masked tile takes the general path (it also keeps NaN values of masked keys
    // away from the rows that do not see them).
    if !(0..dims.rows).all(|r| sc.vis[r].sees_all(k0, k0 + kn)) {
        return false;
    }
    let seq = &ctx.seqs[task.seq];
    let first = seq.k_start + k0;
    let v_view = ctx.v.expect("attention has values");
    let (krows, vrows) = (ctx.k.typed_rows(seq.batch, task.kvh, first), v_view.typed_rows(seq.batch, task.kvh, first));
    let pf = match vrows {
        TypedRows::F32(p, ld) => prefetch_of(p, ld, plan.dv),
        TypedRows::F16(p, ld) => prefetch_of(p, ld, plan.dv),
        TypedRows::BF16(p, ld) => prefetch_of(p, ld, plan.dv),
        TypedRows::I8(p, ld, _, _) => prefetch_of(p, ld, plan.dv),
        TypedRows::Unreadable => return false,
    };
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
        softmax_update::<S>(sc, dims, kn);
        rescale_acc(sc, dims);
        match vrows {
            TypedRows::F32(p, ld) => pv::<S, f32>(sc, dims, p, ld, kn),
            TypedRows::F16(p, ld) => pv::<S, f16>(sc, dims, p, ld, kn),
            TypedRows::BF16(p, ld) => pv::<S, bf16>(sc, dims, p, ld, kn),
            TypedRows::I8(p, ld, s, sld) => {
                scale_rows(sc, dims, kn, s, sld);
                pv::<S, i8>(sc, dims, p, ld, kn)
            }
            TypedRows::Unreadable => unreachable!("attention checked that values are readable"),
        }
    }
    true
}

/// The value rows of a tile, to fetch while the scores are computed.
fn prefetch_of<E>(p: *const E, ld: isize, dv: usize) -> Prefetch {
    let size = size_of::<E>();
    Prefetch { first: p as *const u8, ld_bytes: ld * size as isize, row_bytes: dv * size }
}

/// `acc += P · V` for a fully visible tile whose values are f16, bf16 or int8, read in place
/// (f32 values take the caller's path). Returns false when it does not apply.
///
/// # Safety
/// The scratch is sized for the plan; `first..first + kn` are rows of the validated view.
#[inline(always)]
pub(crate) unsafe fn pv_narrow<S: Simd>(
    sc: &mut Scratch,
    dims: &Dims,
    v: &crate::layout::Strided,
    seq: &crate::mask::Sequence,
    kvh: usize,
    first: usize,
    kn: usize,
) -> bool {
    // SAFETY: forwarded.
    unsafe {
        match v.typed_rows(seq.batch, kvh, first) {
            TypedRows::F16(p, ld) => pv::<S, f16>(sc, dims, p, ld, kn),
            TypedRows::BF16(p, ld) => pv::<S, bf16>(sc, dims, p, ld, kn),
            TypedRows::I8(p, ld, s, sld) => {
                scale_rows(sc, dims, kn, s, sld);
                pv::<S, i8>(sc, dims, p, ld, kn)
            }
            TypedRows::F32(..) | TypedRows::Unreadable => return false,
        }
    }
    true
}

/// Multiplies score/probability row `j` (one key) by that key's int8 scale.
///
/// # Safety
/// `scales` holds `kn` scales `ld` apart.
#[inline(always)]
unsafe fn scale_rows(sc: &mut Scratch, dims: &Dims, kn: usize, scales: *const f32, ld: isize) {
    for j in 0..kn {
        // SAFETY: forwarded.
        let s = unsafe { *scales.offset(j as isize * ld) };
        sc.st[j * dims.rows_p..j * dims.rows_p + dims.cols].iter_mut().for_each(|x| *x *= s);
    }
}

/// `acc += P · V` with V rows read in place.
///
/// # Safety
/// `v` holds `kn` rows of `dvp` elements `ld` apart.
#[inline(always)]
unsafe fn pv<S: Simd, E: Elem>(sc: &mut Scratch, dims: &Dims, v: *const E, ld: isize, kn: usize) {
    let (rows_p, dvp) = (dims.rows_p, dims.dvp);
    // Decoding (few rows): blocks of at most 4 rows, wide strips and no spills. Many rows
    // (prefill): the 6-row block, whose widening loads convert in place.
    if dims.rows > 8 {
        // SAFETY: as below, for all rows at once.
        unsafe {
            gemm::<S, E>(sc.st.as_ptr(), 1, rows_p as isize, v, ld, sc.acc.as_mut_ptr(), dvp, dims.rows, dvp, kn, true)
        };
        return;
    }
    for r0 in (0..dims.rows).step_by(4) {
        let m = 4.min(dims.rows - r0);
        // SAFETY: Pᵀ is kn × rows_p (read as P from column r0), acc rows × dvp (from row r0),
        // V kn × dvp (dv == dvp checked).
        unsafe {
            let (a, c) = (sc.st.as_ptr().add(r0), sc.acc.as_mut_ptr().add(r0 * dvp));
            gemm::<S, E>(a, 1, rows_p as isize, v, ld, c, dvp, m, dvp, kn, true)
        }
    }
}
