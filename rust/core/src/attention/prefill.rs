//! The blocked step for a tile of many query rows (prefill): the score tile by gemm, the
//! online-softmax update, the rescale of the accumulators, then P·V by gemm.
//!
//! It is the general path: any number of rows, masks and biases, values of any storage type
//! (f16, bf16 and int8 read in place when the tile is fully visible, else converted into a
//! buffer once per tile; f32 read in place), and values holding NaN or ∞ behind a mask.

use super::tile::{pv_transposed, score_tile, tile_buffer, widen_rows, Ctx, Dims, Scratch, Task};
use crate::gemm::{gemm, A, B, C};
use crate::layout::TypedRows;
use crate::memory::{mul, Alloc};
use crate::simd::Simd;

/// Runs keys `k0..k0 + kn` (one tile at most) of `task` through the online softmax of its rows.
/// Fails only when a tile to widen cannot be allocated.
///
/// # Safety
/// The scratch is sized for the plan; `k0..k0 + kn` are keys of the task's sequence.
#[inline(always)]
pub(crate) unsafe fn tile<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
) -> Alloc<()> {
    // SAFETY: forwarded; Sᵀ holds a whole tile.
    unsafe {
        score_tile::<S>(ctx, task, sc, dims, k0, kn)?;
        sc.soft.update_cols::<S>(&mut sc.s.st, dims.rows_p, dims.cols, kn);
        sc.soft.rescale(dims.rows, dims.dvp);
        add_pv::<S>(ctx, task, sc, dims, k0, kn)
    }
}

/// `acc += P · V` for the tile's probabilities (in `sc.s.st`, transposed).
///
/// # Safety
/// As for [`tile`].
#[inline(always)]
pub(crate) unsafe fn add_pv<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
) -> Alloc<()> {
    let plan = ctx.plan;
    let (rows_p, dvp, dv) = (dims.rows_p, dims.dvp, plan.dv);
    let seq = &ctx.seqs[task.seq];
    let v_view = ctx.values();
    let first = seq.k_start + k0;
    // When every row sees every key of the tile, a NaN value is read by all of them anyway;
    // only a partly masked tile needs the (costly) check below.
    let all_visible = !sc.s.masked;
    // Half-precision and int8 values go straight into P·V, widened in registers.
    if all_visible && dv == dvp {
        let vrows = v_view.typed_rows(seq.batch, task.kvh, first);
        if !matches!(vrows, TypedRows::F32(..) | TypedRows::Unreadable) {
            // SAFETY: V rows k0..k0 + kn of a validated view; scratch sized by the plan.
            unsafe { pv_transposed::<S>(sc, dims, vrows, kn) };
            return Ok(());
        }
    }
    let in_place = if dv == dvp { v_view.f32_rows(seq.batch, task.kvh, first) } else { None };
    let (b, ldb) = match in_place {
        Some(direct) => direct,
        None => {
            let buf = tile_buffer(&mut sc.kv.v, mul(plan.bc, dvp)?)?;
            // SAFETY: the buffer holds bc × dvp floats; the rows come from the validated view.
            unsafe { widen_rows::<S>(v_view.typed_rows(seq.batch, task.kvh, first), kn, dv, buf, dvp) };
            (sc.kv.v.as_ptr(), dvp as isize)
        }
    };
    let v_finite = all_visible
        || (0..kn).all(|j| {
            // SAFETY: B holds kn rows of at least dv floats `ldb` apart.
            all_finite(unsafe { std::slice::from_raw_parts(b.offset(j as isize * ldb), dv) })
        });
    if v_finite {
        // SAFETY: Pᵀ is kn × rows_p (read as P: row stride 1, column stride rows_p), B is
        // kn × dvp, acc rows × dvp with dvp a multiple of 2·LANES; only real rows are
        // multiplied.
        unsafe {
            let p = A::transposed(sc.s.st.as_ptr(), rows_p);
            gemm::<S, f32>(p, B::new(b, ldb), C::new(sc.soft.acc.as_mut_ptr(), dvp), dims.rows, dvp, kn, true)
        };
    } else {
        // A NaN or ∞ in a value row must reach only the queries that see it:
        // 0·NaN would leak into every row, so skip the zero probabilities.
        for j in 0..kn {
            // SAFETY: as above.
            let vrow = unsafe { std::slice::from_raw_parts(b.offset(j as isize * ldb), dv) };
            for r in 0..dims.rows {
                let p = sc.s.st[j * rows_p + r];
                if p != 0.0 {
                    for (o, &x) in sc.soft.acc[r * dvp..r * dvp + dv].iter_mut().zip(vrow) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Whether no element is NaN or ±∞; an integer max over the exponent bits, which vectorizes
/// (a float test with early exit does not).
#[inline(always)]
fn all_finite(xs: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    xs.iter().fold(0u32, |m, x| m.max(x.to_bits() & EXP)) != EXP
}
