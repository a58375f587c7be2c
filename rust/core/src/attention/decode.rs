//! The few-rows path (decoding): keys and values read once, straight from their storage type.
//!
//! With one or a few query tokens, each K/V element feeds only the handful of query heads of
//! its group, so the work is bound by reading K and V. This path reads the rows in place —
//! f32, f16, bf16 or int8 — and widens them in registers: no tile is converted into a buffer.
//! int8 scales are per row, so they multiply a key's scores after the dot products and a
//! value's probabilities before P·V.

use super::blocked::{mask_tile, rescale_acc, scores_few, softmax_update, Dims, Scratch};
use super::gemm::{gemm, stream_rows};
use super::{Ctx, Task};
use crate::layout::{DType, TypedRows};
use crate::simd::{elem::Elem, request_one_row_streams, row_ptrs, Prefetch, Simd};
use half::{bf16, f16};

/// Keys per step for a streamed row (see [`streamed_row`]): K and V are read in runs this
/// long, one row after another, so that the hardware prefetchers see two long streams. On
/// Zen 4, with 128-key tiles and requests ahead (the scheme of the GQA rows, where each key
/// feeds several rows' arithmetic) one core read 21–23 GB/s of fp32; this way, without
/// requests, 26–28, and int8 on the VNNI path 19 → 28 (`benches/NOTES.md`). Where the runs are
/// also requested ahead, see [`request_one_row_streams`].
pub(crate) const ONE_ROW_KEYS: usize = 2048;

/// How many keys `accumulate` hands to [`tile`] at a time: [`ONE_ROW_KEYS`] for a plain
/// streamed row that sees all of `kmin..kmax`, the plan's tile otherwise.
pub(crate) fn keys_per_step<S: Simd>(ctx: &Ctx, sc: &Scratch, dims: &Dims, kmin: usize, kmax: usize) -> usize {
    let one_row = streamed_row::<S>(ctx, dims) && ctx.extras.is_plain();
    if one_row && sc.vis[0].sees_all(kmin, kmax) && ldr(ONE_ROW_KEYS) <= sc.st.len() {
        ONE_ROW_KEYS
    } else {
        ctx.plan.bc
    }
}

/// A task of one row (a decode step without GQA) whose keys are read as a plain stream: in
/// [`ONE_ROW_KEYS`] runs, each row whole and in address order (with software requests only
/// where [`request_one_row_streams`] says so).
/// Float keys on every path; int8 keys on the AVX-512 path only, whose integer (VNNI) or
/// widening arithmetic keeps up with the stream. The AVX2 path's int8 arithmetic does not
/// (measured 1.26× slower this way), and there the requests ahead pay.
fn streamed_row<S: Simd>(ctx: &Ctx, dims: &Dims) -> bool {
    dims.rows == 1 && (ctx.k.dtype() != DType::I8 || S::LANES == 16)
}

/// `buf` holding at least `len` elements (grown, zero-filled, on first need).
fn at_least<T: Copy + Default>(buf: &mut Vec<T>, len: usize) {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
}

/// Runs keys `k0..k0 + kn` of `task` through the typed path when it applies (few rows, every
/// row sees the whole tile, the value width a multiple of the vector pair); returns false
/// otherwise, leaving everything untouched. `kn` may exceed the plan's tile only where the
/// row-major layout holds it.
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
    if matches!(krows, TypedRows::Unreadable) || matches!(vrows, TypedRows::Unreadable) {
        return false;
    }
    if ctx.extras.is_plain() && dims.rows * ldr(kn.max(plan.bc)) <= sc.st.len() {
        // SAFETY: forwarded; the score rows fit in `st` (checked above).
        unsafe { row_major::<S>(ctx, sc, dims, krows, vrows, kn) };
        return true;
    }
    // The transposed layout holds one tile.
    if kn > plan.bc {
        return false;
    }
    let pf = prefetch_of(vrows, plan.dv);
    // Biases: the transposed layout, which the bias folding reads.
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
        let (st, rs, ks) = (sc.st.as_ptr(), 1, dims.rows_p as isize);
        match vrows {
            TypedRows::F32(p, ld) => pv::<S, f32>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::F16(p, ld) => pv::<S, f16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::BF16(p, ld) => pv::<S, bf16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::I8(p, ld, s, sld) => {
                scale_rows(sc, dims, kn, s, sld);
                pv::<S, i8>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE)
            }
            TypedRows::Unreadable => unreachable!("checked above"),
        }
    }
    true
}

/// Requests for `width` elements of each row of `rows`.
fn prefetch_of(rows: TypedRows, width: usize) -> Prefetch {
    match rows {
        TypedRows::F32(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::F16(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::BF16(p, ld) => Prefetch::of(p, ld, width),
        TypedRows::I8(p, ld, _, _) => Prefetch::of(p, ld, width),
        TypedRows::Unreadable => Prefetch::NONE,
    }
}

/// Stride of the row-major score rows: the key tile padded to whole vectors of every ISA.
fn ldr(bc: usize) -> usize {
    bc.div_ceil(32) * 32
}

/// The tile with scores kept row-major (`rows × keys`, rows `ldr` of the keys at hand apart):
/// four keys' dot products finish in one shuffle tree, the softmax runs along keys a whole
/// vector at a time, and int8 scales multiply vectors of keys. Only for plain attention (no
/// mask or bias, which fold into the transposed layout).
///
/// K and V are each read once, in order. With several rows they are requested ahead while
/// they are read (see [`Prefetch::ahead`]): the keys during the scores, the values during
/// P·V. A streamed row is requested only where that measured faster
/// ([`request_one_row_streams`]); elsewhere the hardware prefetchers follow its long runs of
/// rows read one after another (see [`streamed_row`]).
///
/// # Safety
/// As for [`tile`]; `rows · ldr(max(kn, bc))` floats fit in `sc.st`.
#[inline(always)]
unsafe fn row_major<S: Simd>(ctx: &Ctx, sc: &mut Scratch, dims: &Dims, krows: TypedRows, vrows: TypedRows, kn: usize) {
    let plan = ctx.plan;
    let ld = ldr(kn.max(plan.bc));
    let (pf, vpf) = if streamed_row::<S>(ctx, dims) && !request_one_row_streams(S::LANES == 16) {
        (Prefetch::NONE, Prefetch::NONE)
    } else {
        (prefetch_of(krows, plan.d), prefetch_of(vrows, plan.dv))
    };
    if matches!(krows, TypedRows::I8(..)) || matches!(vrows, TypedRows::I8(..)) {
        // int8 scales and rounded probabilities, per key: a streamed run is longer than a tile.
        at_least(&mut sc.keyscale, kn);
        at_least(&mut sc.pairs, dims.rows * ld / 2);
    }
    // SAFETY: rows come from validated views (kn rows in range); scratch sized by the plan.
    unsafe {
        match krows {
            TypedRows::F32(p, lk) => scores_rows::<S, f32>(p, lk, sc, dims.rows, plan.d, ld, kn, pf),
            TypedRows::F16(p, lk) => scores_rows::<S, f16>(p, lk, sc, dims.rows, plan.d, ld, kn, pf),
            TypedRows::BF16(p, lk) => scores_rows::<S, bf16>(p, lk, sc, dims.rows, plan.d, ld, kn, pf),
            TypedRows::I8(p, lk, s, sld) => {
                if !int8_dots::<S>(p, lk, sc, dims.rows, plan.d, ld, kn, pf) {
                    scores_rows::<S, i8>(p, lk, sc, dims.rows, plan.d, ld, kn, pf);
                }
                scale_keys::<S>(sc, dims.rows, ld, kn, s, sld);
            }
            TypedRows::Unreadable => unreachable!("checked by the caller"),
        }
        if let Some(c) = ctx.params.softcap {
            let (inv, mul) = (1.0 / c, c * std::f32::consts::LOG2_E);
            for r in 0..dims.rows {
                sc.st[r * ld..r * ld + kn].iter_mut().for_each(|x| *x = mul * (*x * inv).tanh());
            }
        }
        softmax_rows::<S>(sc, dims.rows, ld, kn);
        rescale_acc(sc, dims);
        let st = sc.st.as_ptr();
        match vrows {
            TypedRows::F32(p, lv) => pv::<S, f32>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::F16(p, lv) => pv::<S, f16>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::BF16(p, lv) => pv::<S, bf16>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf),
            TypedRows::I8(p, lv, s, sld) => {
                scale_keys::<S>(sc, dims.rows, ld, kn, s, sld);
                if !int8_pv::<S>(sc, dims, ld, p, lv, kn, vpf) {
                    pv::<S, i8>(sc, dims, st, ld as isize, 1, p, lv, kn, vpf)
                }
            }
            TypedRows::Unreadable => unreachable!("checked by the caller"),
        }
    }
}

/// `acc += P · V` for int8 values with integer dot products, where the AVX-512 path runs on a
/// CPU with VNNI: each row's probabilities (value scales folded in) are rounded to 16 bits
/// against the row's largest in the tile. Returns false (nothing written) otherwise.
///
/// # Safety
/// P is the row-major tile (`ld` apart) with value scales applied; `v` holds `kn` rows of
/// `dims.dvp` int8 `ldv` apart.
#[inline(always)]
unsafe fn int8_pv<S: Simd>(
    sc: &mut Scratch,
    dims: &Dims,
    ld: usize,
    v: *const i8,
    ldv: isize,
    kn: usize,
    pf: Prefetch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::vnni;
        if S::LANES == 16 && dims.dvp.is_multiple_of(32) && vnni::available() {
            // Whole vectors of keys: the softmax left zeros past the last key.
            let kp = kn.div_ceil(16) * 16;
            if dims.rows == 1 && kp <= vnni::PV_BLOCK * 64 {
                // One scale per block of keys, as a tile has: a whole run rounded against its
                // largest probability would round the small ones coarser.
                let mut scales = [0f32; 64];
                for (b, s) in scales.iter_mut().enumerate().take(kp.div_ceil(vnni::PV_BLOCK)) {
                    let (k0, n) = (b * vnni::PV_BLOCK, vnni::PV_BLOCK.min(kp - b * vnni::PV_BLOCK));
                    // SAFETY: the CPU has the features (checked); the row holds kp ≤ ld floats
                    // and `pairs` ld / 2 words.
                    match unsafe { vnni::pack_probs(sc.st.as_ptr().add(k0), n, sc.pairs.as_mut_ptr().add(k0 / 2)) } {
                        Some(x) => *s = x,
                        None => return false,
                    }
                }
                // SAFETY: the CPU has the features (checked); one row of kp / 2 words and of `dvp`
                // accumulators; V as the caller vouched.
                unsafe {
                    vnni::pv_one(sc.pairs.as_ptr(), scales.as_ptr(), v, ldv, dims.dvp, kn, sc.acc.as_mut_ptr(), pf)
                };
                return true;
            }
            let ldp = kp / 2;
            let mut scales = [0f32; 8];
            // Every row is rounded before anything is accumulated, so a row that cannot be
            // (NaN or ∞) sends the whole tile to the float path untouched.
            for (r, s) in scales.iter_mut().enumerate().take(dims.rows) {
                // SAFETY: the CPU has the features (checked); row r holds kp ≤ ld floats and
                // `pairs` 8 rows of ld / 2 words.
                match unsafe { vnni::pack_probs(sc.st.as_ptr().add(r * ld), kp, sc.pairs.as_mut_ptr().add(r * ldp)) } {
                    Some(x) => *s = x,
                    None => return false,
                }
            }
            let (pairs, acc, dvp) = (sc.pairs.as_ptr(), sc.acc.as_mut_ptr(), dims.dvp);
            for (r0, m, pf) in pf.passes(dims.rows, 4) {
                // SAFETY: the CPU has the features (checked); rows r0..r0 + m of `ldp` words and
                // of `dvp` accumulators; V as the caller vouched.
                unsafe {
                    let (p, s, c) = (pairs.add(r0 * ldp), scales.as_ptr().add(r0), acc.add(r0 * dvp));
                    vnni::pv_i8(p, ldp, s, m, v, ldv, dvp, kn, c, dvp, pf)
                };
            }
            return true;
        }
    }
    let _ = (sc, dims, ld, v, ldv, kn, pf);
    false
}

/// `S[r, j] = Q[r]·K[j]` for `rows` rows into `sc.st` (row-major, `ld` apart), in passes of as
/// many rows as keep their accumulators in registers; `pf` requests the key rows ahead during
/// the first pass.
///
/// # Safety
/// `k` holds `kn` rows of `d` elements `ldk` apart; `rows · ld` floats fit in `sc.st`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_rows<S: Simd, E: Elem>(
    k: *const E,
    ldk: isize,
    sc: &mut Scratch,
    rows: usize,
    d: usize,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) {
    // Four keys of R rows take 4·R accumulators and four key vectors: R = 4 fits the 32
    // registers of AVX-512, R = 2 the 16 of AVX2.
    let pass = if S::LANES >= 16 { 4 } else { 2 };
    let (q, st) = (sc.q.as_ptr(), sc.st.as_mut_ptr());
    for (r0, m, pf) in pf.passes(rows, pass) {
        // SAFETY: rows r0..r0 + m of Q and of S are in range.
        unsafe {
            let (q, st) = (q.add(r0 * d), st.add(r0 * ld));
            match m {
                1 => dots_rows::<S, E, 1>(k, ldk, q, d, st, ld, kn, pf),
                2 => dots_rows::<S, E, 2>(k, ldk, q, d, st, ld, kn, pf),
                3 => dots_rows::<S, E, 3>(k, ldk, q, d, st, ld, kn, pf),
                _ => dots_rows::<S, E, 4>(k, ldk, q, d, st, ld, kn, pf),
            }
        }
    }
}

/// [`scores_rows`] for exactly `R` rows: four keys at a time, then one.
///
/// # Safety
/// As for [`scores_rows`], with `R` rows at `q` and `st`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dots_rows<S: Simd, E: Elem, const R: usize>(
    k: *const E,
    ldk: isize,
    q: *const f32,
    d: usize,
    st: *mut f32,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) {
    let l = S::LANES;
    let body = d - d % l;
    // Columns past the vector body, in plain arithmetic, added to the stored sums.
    let tail = |j: usize, r: usize| -> f32 {
        // SAFETY: key j < kn and row r < R are in range, columns body..d too.
        unsafe {
            let kr = k.offset(j as isize * ldk);
            (body..d).map(|c| *q.add(r * d + c) * (*kr.add(c)).to_f32()).sum()
        }
    };
    let mut j = 0;
    // SAFETY: every pointer below stays inside the extents the caller vouched for.
    unsafe {
        while j + 4 <= kn {
            pf.ahead(j, 4);
            let kr = row_ptrs::<E, 4>(k, ldk, j);
            let mut acc = [[S::zero(); 4]; R];
            if R == 1 {
                // One row has no query vector to share between keys: read each key row whole,
                // in address order, which the hardware prefetchers follow (reading four rows
                // a column at a time halved what they fetched on Zen 4).
                for (t, p) in kr.iter().enumerate() {
                    for c in (0..body).step_by(l) {
                        acc[0][t] = S::fma(S::load(q.add(c)), E::load::<S>(p.add(c)), acc[0][t]);
                    }
                }
            } else {
                for c in (0..body).step_by(l) {
                    // Plain loops, not `array::from_fn` (see `gemm`).
                    let mut kv = [S::zero(); 4];
                    for (x, p) in kv.iter_mut().zip(&kr) {
                        *x = E::load::<S>(p.add(c));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = S::load(q.add(r * d + c));
                        for (x, &kt) in a.iter_mut().zip(&kv) {
                            *x = S::fma(qv, kt, *x);
                        }
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let out = st.add(r * ld + j);
                S::store_sums4(a[0], a[1], a[2], a[3], out);
                if body < d {
                    for t in 0..4 {
                        *out.add(t) += tail(j + t, r);
                    }
                }
            }
            j += 4;
        }
        while j < kn {
            let kr = k.offset(j as isize * ldk);
            let mut acc = [S::zero(); R];
            for c in (0..body).step_by(l) {
                let kv = E::load::<S>(kr.add(c));
                for (r, x) in acc.iter_mut().enumerate() {
                    *x = S::fma(S::load(q.add(r * d + c)), kv, *x);
                }
            }
            for (r, &x) in acc.iter().enumerate() {
                *st.add(r * ld + j) = S::reduce_sum(x) + tail(j, r);
            }
            j += 1;
        }
    }
}

/// [`scores_rows`] for int8 keys with integer dot products, where the AVX-512 path runs on a
/// CPU with VNNI; returns false (nothing written) otherwise.
///
/// # Safety
/// As for [`scores_rows`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn int8_dots<S: Simd>(
    k: *const i8,
    ldk: isize,
    sc: &mut Scratch,
    rows: usize,
    d: usize,
    ld: usize,
    kn: usize,
    pf: Prefetch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::vnni;
        // LANES == 16 is the AVX-512 path: a forced lower path never reaches these instructions.
        if S::LANES == 16
            && d.is_multiple_of(32)
            && d <= vnni::MAX_D
            && vnni::available()
            && *sc.q16_ready.get_or_insert_with(|| vnni::quantize(&sc.q, rows, d, &mut sc.q16, &mut sc.qscale))
        {
            let (q16, qs, st) = (sc.q16.as_ptr(), sc.qscale.as_ptr(), sc.st.as_mut_ptr());
            // SAFETY: the CPU has the features (checked); d is a multiple of 32; Q was rounded
            // for `rows` rows; the rest is forwarded.
            unsafe { vnni::scores(k, ldk, q16, qs, rows, d, st, ld, kn, pf) };
            return true;
        }
    }
    let _ = (k, ldk, sc, rows, d, ld, kn, pf);
    false
}

/// Multiplies column `j` (one key) of the row-major tile by that key's int8 scale: the scales
/// are gathered once, then applied a vector of keys at a time.
///
/// # Safety
/// `scales` holds `kn` scales `sld` apart; `rows · ld` floats fit in `sc.st`.
#[inline(always)]
unsafe fn scale_keys<S: Simd>(sc: &mut Scratch, rows: usize, ld: usize, kn: usize, scales: *const f32, sld: isize) {
    let l = S::LANES;
    let body = kn - kn % l;
    let ks = &mut sc.keyscale[..kn];
    for (j, x) in ks.iter_mut().enumerate() {
        // SAFETY: forwarded.
        *x = unsafe { *scales.offset(j as isize * sld) };
    }
    for r in 0..rows {
        let row = &mut sc.st[r * ld..r * ld + kn];
        // SAFETY: body ≤ kn floats of both slices.
        unsafe {
            for c in (0..body).step_by(l) {
                let p = row.as_mut_ptr().add(c);
                S::store(p, S::fma(S::load(p), S::load(ks.as_ptr().add(c)), S::zero()));
            }
        }
        row[body..].iter_mut().zip(&ks[body..]).for_each(|(x, s)| *x *= s);
    }
}

/// The online softmax of a row-major (base-2) score tile: each row's max and sum along its
/// keys, a vector at a time; leaves probabilities in the tile and rescale factors in
/// `sc.alpha`, as [`super::blocked::softmax_update`] does for the transposed tile.
///
/// # Safety
/// `rows · ld` floats fit in `sc.st`, with `kn` rounded up to `LANES` ≤ `ld`.
#[inline(always)]
unsafe fn softmax_rows<S: Simd>(sc: &mut Scratch, rows: usize, ld: usize, kn: usize) {
    let l = S::LANES;
    let kp = kn.div_ceil(l) * l;
    for r in 0..rows {
        let row = &mut sc.st[r * ld..r * ld + kp];
        // Padding keys give 2^(−∞) = 0 and never reach P·V.
        row[kn..].fill(f32::NEG_INFINITY);
        let p = row.as_mut_ptr();
        // SAFETY: kp floats at p.
        unsafe {
            let mut mx = S::splat(f32::NEG_INFINITY);
            for c in (0..kp).step_by(l) {
                mx = S::max(mx, S::load(p.add(c)));
            }
            let (m_old, t) = (sc.m[r], S::reduce_max(mx));
            let m_new = if m_old > t { m_old } else { t };
            sc.alpha[r] = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp2() };
            sc.m[r] = m_new;
            // A row that has seen nothing yet subtracts 0, so 2^(−∞ − 0) = 0, not NaN.
            let mv = S::splat(if m_new == f32::NEG_INFINITY { 0.0 } else { m_new });
            let mut sum = S::zero();
            for c in (0..kp).step_by(l) {
                let e = S::exp2(S::sub(S::load(p.add(c)), mv));
                S::store(p.add(c), e);
                sum = S::add(sum, e);
            }
            sc.l[r] = sc.l[r] * sc.alpha[r] + S::reduce_sum(sum);
        }
    }
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
    let (st, rs, ks) = (sc.st.as_ptr(), 1, dims.rows_p as isize);
    // SAFETY: forwarded.
    unsafe {
        match v.typed_rows(seq.batch, kvh, first) {
            TypedRows::F16(p, ld) => pv::<S, f16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::BF16(p, ld) => pv::<S, bf16>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE),
            TypedRows::I8(p, ld, s, sld) => {
                scale_rows(sc, dims, kn, s, sld);
                pv::<S, i8>(sc, dims, st, rs, ks, p, ld, kn, Prefetch::NONE)
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

/// `acc += P · V` with V rows read in place; P's element `(row, key)` is at `p + row·rs +
/// key·ks` (the transposed tile or the row-major one); `pf` requests the value rows ahead
/// ([`Prefetch::NONE`] where they were requested already).
///
/// # Safety
/// `v` holds `kn` rows of `dvp` elements `ld` apart; P holds `rows × kn` probabilities.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<S: Simd, E: Elem>(
    sc: &mut Scratch,
    dims: &Dims,
    p: *const f32,
    rs: isize,
    ks: isize,
    v: *const E,
    ld: isize,
    kn: usize,
    pf: Prefetch,
) {
    let dvp = dims.dvp;
    // Decoding (few rows): blocks of at most 4 rows, V read in one pass. Many rows
    // (prefill): the 6-row block, whose widening loads convert in place.
    if dims.rows > 8 {
        // SAFETY: as below, for all rows at once.
        unsafe { gemm::<S, E>(p, rs, ks, v, ld, sc.acc.as_mut_ptr(), dvp, dims.rows, dvp, kn, true) };
        return;
    }
    // Later blocks read V again, from cache: the requests go with the first.
    for (r0, m, pf) in pf.passes(dims.rows, 4) {
        // SAFETY: P from row r0, acc rows × dvp (from row r0), V kn × dvp (dv == dvp checked).
        unsafe {
            let (a, c) = (p.offset(r0 as isize * rs), sc.acc.as_mut_ptr().add(r0 * dvp));
            stream_rows::<S, E>(a, rs, ks, v, ld, c, dvp, m, dvp, kn, pf)
        }
    }
}
