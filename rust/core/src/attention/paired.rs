//! The blocked step on bf16 pair products (`simd::pairs`): both products of a tile, `Sᵀ =
//! K·Qᵀ` and `O += P·V`, on a unit that multiplies pairs of bf16 with f32 accumulation, for
//! bf16 inputs (exact products of the stored values) and for f32 inputs at a lower
//! [`Precision`] (each operand one bf16 part, or split into three products).
//!
//! Q·Kᵀ pairs along the head dimension: K rows as stored are such pairs (bf16 with an even D
//! are read in place), the task's unscaled queries are packed once, transposed into pair rows;
//! the score scale is applied to the f32 sums, so bf16 queries are not rounded again. P·V pairs
//! along keys: the probabilities (f32, after the online softmax) are rounded to bf16 pairs of
//! consecutive keys, V is packed once per key tile into interleaved row pairs, read by every
//! query head of the task's group. Masks, biases, softcap and the online softmax run on the
//! f32 scores as on the f32 step (`tile`), which this step leaves the same state for.

use super::prefill;
use super::tile::{mask_tile, query_mul, row_of, Ctx, Dims, Paired, Scratch, Task};
use crate::layout::TypedRows;
use crate::memory::{Alloc, NoMemory};
use crate::simd::pairs::{Pairs, Rows, Side};
use crate::simd::Simd;

/// Rows below which a tile stays on the f32 step: few rows pad the product's 16-lane columns
/// mostly with zeros (decoding's tiles).
const MIN_ROWS: usize = 9;

/// `buf` with at least `len` elements (zeros where new); `Err` when they cannot be allocated.
fn sized<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> Alloc<*mut T> {
    if buf.len() < len {
        buf.try_reserve_exact(len - buf.len()).map_err(|_| NoMemory { bytes: None })?;
        buf.resize(len, T::default());
    }
    Ok(buf.as_mut_ptr())
}

/// f32 or bf16 rows of a view, as the packing reads them; `None` for other types.
fn rows_of(t: TypedRows) -> Option<Rows> {
    match t {
        TypedRows::F32(p, ld) => Some(Rows::F32(p, ld)),
        TypedRows::BF16(p, ld) => Some(Rows::BF16(p as *const u16, ld)),
        _ => None,
    }
}

/// Runs keys `k0..k0 + kn` of `task` as `prefill::tile` does, on pair products; returns false
/// (having done nothing) where the step does not apply: few rows, or not the AVX-512 path.
/// Fails only when a packing buffer cannot be allocated.
///
/// # Safety
/// The scratch is sized for the plan; `k0..k0 + kn` are keys of the task's sequence; `mode`
/// came from [`Paired::choose`] for this call's types.
#[inline(always)]
pub(crate) unsafe fn tile<S: Simd>(
    ctx: &Ctx,
    task: &Task,
    sc: &mut Scratch,
    dims: &Dims,
    k0: usize,
    kn: usize,
    mode: Paired,
) -> Alloc<bool> {
    if S::LANES != 16 || dims.rows < MIN_ROWS {
        return Ok(false);
    }
    let plan = &ctx.plan;
    let seq = &ctx.seqs[task.seq];
    let first = seq.k_start + k0;
    let (Some(krows), Some(vrows)) = (
        rows_of(ctx.k.typed_rows(seq.batch, task.kvh, first)),
        rows_of(ctx.values().typed_rows(seq.batch, task.kvh, first)),
    ) else {
        return Ok(false);
    };
    let (unit, terms) = (mode.unit, mode.terms);
    let (d, rows_p, dvp) = (plan.d, dims.rows_p, dims.dvp);
    let dp = d.next_multiple_of(2);
    let w2 = terms * dp / 2;
    if !sc.pairs.ready {
        pack_queries(ctx, task, sc, dims, mode)?;
    }
    // SAFETY: buffers sized below for the extents each call names; K and V rows come from
    // the validated views; `unit` is available (the caller's promise).
    unsafe {
        // Sᵀ = K·Qᵀ, scaled.
        let a = match krows {
            Rows::BF16(p, ld) if terms == 1 && d.is_multiple_of(2) && ld % 2 == 0 => {
                Pairs { p: p as *const u32, rs: ld / 2, ks: 1 }
            }
            _ => {
                let buf = sized(&mut sc.pairs.k, plan.bc * 2 * w2)?;
                unit.pack_rows(krows, kn, d, terms, Side::Second, buf, 2 * w2);
                Pairs { p: buf as *const u32, rs: w2 as isize, ks: 1 }
            }
        };
        let st = sc.s.st.as_mut_ptr();
        unit.gemm(a, sc.pairs.qt.as_ptr(), rows_p, st, rows_p, kn, dims.cols, w2, query_mul(ctx), false);
        mask_tile(ctx, sc, dims, k0, kn);
        sc.soft.update_cols::<S>(&mut sc.s.st, rows_p, dims.cols, kn);
        sc.soft.rescale(dims.rows, dvp);
        // A NaN or ∞ value behind a mask must reach only the rows that see it, which the f32
        // step sees to (0·NaN would leak into every row here).
        if sc.s.masked && !all_finite(vrows, kn, plan.dv) {
            prefill::add_pv::<S>(ctx, task, sc, dims, k0, kn)?;
            return Ok(true);
        }
        // O += P·V.
        let half = kn.div_ceil(2);
        let vp = sized(&mut sc.pairs.v, terms * plan.bc.div_ceil(2) * dvp)?;
        unit.pack_row_pairs(vrows, kn, plan.dv, dvp, terms, Side::Second, vp, dvp);
        let pp = sized(&mut sc.pairs.p, terms * plan.bc.div_ceil(2) * rows_p)?;
        let probs = Rows::F32(sc.s.st.as_ptr(), rows_p as isize);
        unit.pack_row_pairs(probs, kn, dims.cols, dims.cols, terms, Side::First, pp, rows_p);
        let a = Pairs { p: pp, rs: 1, ks: rows_p as isize };
        unit.gemm(a, vp, dvp, sc.soft.acc.as_mut_ptr(), dvp, dims.rows, dvp, terms * half, 1.0, true);
    }
    Ok(true)
}

/// Packs the task's queries, unscaled, into pair rows of Qᵀ (`sc.pairs.qt`), padding rows
/// zero.
fn pack_queries(ctx: &Ctx, task: &Task, sc: &mut Scratch, dims: &Dims, mode: Paired) -> Alloc<()> {
    let plan = &ctx.plan;
    let seq = &ctx.seqs[task.seq];
    let (d, rows_p, terms) = (plan.d, dims.rows_p, mode.terms);
    let ldq = terms * d.next_multiple_of(2);
    let qrows = sized(&mut sc.pairs.qrows, rows_p * ldq)?;
    let qt = sized(&mut sc.pairs.qt, ldq / 2 * rows_p)?;
    for r in 0..dims.rows {
        let (h, i) = row_of(plan, task, r);
        ctx.q.read_row(seq.batch, h, seq.q_start + i, &mut sc.row, 1.0);
        // SAFETY: one row of d floats in `sc.row`; row r of `qrows` holds ldq elements; the
        // unit is available (the caller's promise).
        unsafe {
            mode.unit.pack_rows(Rows::F32(sc.row.as_ptr(), 0), 1, d, terms, Side::First, qrows.add(r * ldq), ldq)
        };
    }
    // SAFETY: rows × ldq/2 words in, ldq/2 rows of rows_p words out.
    unsafe {
        crate::simd::pairs::transpose_words(qrows as *const u32, dims.rows, ldq / 2, ldq / 2, qt, rows_p);
        for p in 0..ldq / 2 {
            std::slice::from_raw_parts_mut(qt.add(p * rows_p + dims.rows), rows_p - dims.rows).fill(0);
        }
    }
    sc.pairs.ready = true;
    Ok(())
}

/// Whether the first `n` values of `kn` rows are all finite (neither NaN nor ±∞).
fn all_finite(rows: Rows, kn: usize, n: usize) -> bool {
    // SAFETY: the rows come from the validated view, kn rows of n elements.
    unsafe {
        match rows {
            Rows::F32(p, ld) => (0..kn).all(|j| {
                let row = std::slice::from_raw_parts(p.offset(j as isize * ld), n);
                row.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7f80_0000)) != 0x7f80_0000
            }),
            Rows::BF16(p, ld) => (0..kn).all(|j| {
                let row = std::slice::from_raw_parts(p.offset(j as isize * ld), n);
                row.iter().fold(0u16, |m, x| m.max(x & 0x7f80)) != 0x7f80
            }),
        }
    }
}
