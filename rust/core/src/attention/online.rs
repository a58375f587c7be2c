//! The online softmax: each row's running max `m` and sum `l` over the key tiles seen so far,
//! and its unnormalized output, updated one score tile at a time so that no row's full score
//! vector ever exists; then one row's output and LSE, and the exact merge of partial states
//! computed over disjoint key ranges (split-K decoding).
//!
//! Scores are in base 2 throughout the kernels (`m` is a base-2 max); the LSE handed out is
//! natural. The operations take the score tile as a plain slice with its layout (transposed
//! for the blocked path, row-major for the few-rows path), so this module knows nothing of
//! the buffers around it.

use crate::memory::{zeroed, Alloc};
use crate::simd::Simd;
use std::f32::consts::LN_2;

/// The running state of a task's rows (padded to `rows_p`), reused across tasks.
pub(crate) struct Online {
    /// Running max (base 2) and sum of each row.
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    /// Each row's rescale factor from the last update: what its accumulator must be multiplied
    /// by before the tile's P·V is added.
    pub alpha: Vec<f32>,
    /// Per tile: the row max (then the max to subtract) and the row sum.
    tmax: Vec<f32>,
    tsum: Vec<f32>,
    /// Unnormalized output rows (`rows_p × dvp`, rows `dvp` apart).
    pub acc: Vec<f32>,
}

impl Online {
    /// State for `rows_p` rows with `acc_len` accumulator floats.
    pub(crate) fn new(rows_p: usize, acc_len: usize) -> Alloc<Online> {
        Ok(Online {
            m: zeroed(rows_p)?,
            l: zeroed(rows_p)?,
            alpha: zeroed(rows_p)?,
            tmax: zeroed(rows_p)?,
            tsum: zeroed(rows_p)?,
            acc: zeroed(acc_len)?,
        })
    }

    /// Starts `rows` rows afresh (nothing seen: `m = −∞`, `l = 0`) and zeroes the first `acc`
    /// accumulator floats (none for a pass that makes no output rows).
    #[inline]
    pub(crate) fn start(&mut self, rows: usize, acc: usize) {
        self.m[..rows].fill(f32::NEG_INFINITY);
        self.l[..rows].fill(0.0);
        self.acc[..acc].fill(0.0);
    }

    /// Folds a transposed (base-2) score tile into the running max and sum of every row: `st`
    /// holds key `j` of row `r` at `j·ld + r` for `kn` keys, and is left holding probabilities
    /// relative to the new max; each row's rescale factor is left in `alpha`. `cols` (the rows
    /// rounded up to `LANES`) columns are updated, a vector of rows at a time.
    ///
    /// # Safety
    /// `st` holds `kn × ld` floats; `cols ≤ ld` is a multiple of `LANES` and at most the rows
    /// this state holds.
    #[inline(always)]
    pub(crate) unsafe fn update_cols<S: Simd>(&mut self, st: &mut [f32], ld: usize, cols: usize, kn: usize) {
        let l = S::LANES;
        debug_assert!(st.len() >= kn * ld && cols <= ld);
        let st = st.as_mut_ptr();
        // SAFETY: st holds kn × ld floats and the per-row arrays `cols`, a multiple of LANES.
        unsafe {
            for c in (0..cols).step_by(l) {
                let mut mx = S::splat(f32::NEG_INFINITY);
                for j in 0..kn {
                    mx = S::max(mx, S::load(st.add(j * ld + c)));
                }
                S::store(self.tmax.as_mut_ptr().add(c), mx);
            }
            for r in 0..cols {
                let (m_old, t) = (self.m[r], self.tmax[r]);
                let m_new = if m_old > t { m_old } else { t };
                self.alpha[r] = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp2() };
                self.m[r] = m_new;
                // A row that has seen nothing yet subtracts 0, so 2^(−∞ − 0) = 0, not NaN.
                self.tmax[r] = if m_new == f32::NEG_INFINITY { 0.0 } else { m_new };
            }
            for c in (0..cols).step_by(l) {
                let mv = S::load(self.tmax.as_ptr().add(c));
                let mut sum = S::zero();
                for j in 0..kn {
                    let p = S::exp2(S::sub(S::load(st.add(j * ld + c)), mv));
                    S::store(st.add(j * ld + c), p);
                    sum = S::add(sum, p);
                }
                S::store(self.tsum.as_mut_ptr().add(c), sum);
            }
            for r in 0..cols {
                self.l[r] = self.l[r] * self.alpha[r] + self.tsum[r];
            }
        }
    }

    /// [`Online::update_cols`] for a row-major (base-2) score tile: row `r` holds its `kn` keys
    /// at `r·ld`; each row's max and sum are taken along its keys, a vector at a time. Keys
    /// `kn..` up to the next multiple of `LANES` are set to −∞ (probability 0).
    ///
    /// # Safety
    /// `st` holds `rows × ld` floats, with `kn` rounded up to `LANES` ≤ `ld`.
    #[inline(always)]
    pub(crate) unsafe fn update_rows<S: Simd>(&mut self, st: &mut [f32], rows: usize, ld: usize, kn: usize) {
        let l = S::LANES;
        let kp = kn.div_ceil(l) * l;
        for r in 0..rows {
            let row = &mut st[r * ld..r * ld + kp];
            // Padding keys give 2^(−∞) = 0 and never reach P·V.
            row[kn..].fill(f32::NEG_INFINITY);
            let p = row.as_mut_ptr();
            // SAFETY: kp floats at p.
            unsafe {
                let mut mx = S::splat(f32::NEG_INFINITY);
                for c in (0..kp).step_by(l) {
                    mx = S::max(mx, S::load(p.add(c)));
                }
                let (m_old, t) = (self.m[r], S::reduce_max(mx));
                let m_new = if m_old > t { m_old } else { t };
                self.alpha[r] = if m_old == f32::NEG_INFINITY { 0.0 } else { (m_old - m_new).exp2() };
                self.m[r] = m_new;
                // A row that has seen nothing yet subtracts 0, so 2^(−∞ − 0) = 0, not NaN.
                let mv = S::splat(if m_new == f32::NEG_INFINITY { 0.0 } else { m_new });
                let mut sum = S::zero();
                for c in (0..kp).step_by(l) {
                    let e = S::exp2(S::sub(S::load(p.add(c)), mv));
                    S::store(p.add(c), e);
                    sum = S::add(sum, e);
                }
                self.l[r] = self.l[r] * self.alpha[r] + S::reduce_sum(sum);
            }
        }
    }

    /// Multiplies each of the first `rows` accumulator rows (`dvp` apart) by its rescale factor.
    #[inline(always)]
    pub(crate) fn rescale(&mut self, rows: usize, dvp: usize) {
        for r in 0..rows {
            let a = self.alpha[r];
            if a != 1.0 {
                self.acc[r * dvp..(r + 1) * dvp].iter_mut().for_each(|x| *x *= a);
            }
        }
    }

    /// Row `r`'s output (its first `dv` values, accumulators `dvp` apart) into `out`, and its
    /// natural LSE; see [`finish_row`].
    #[inline]
    pub(crate) fn finish(&self, r: usize, dv: usize, dvp: usize, out: &mut [f32], sink: Option<f32>) -> f32 {
        finish_row(&self.acc[r * dvp..r * dvp + dv], self.m[r], self.l[r], out, sink)
    }

    /// Stores the state of the first `rows` rows (their first `dv` values, accumulators `dvp`
    /// apart) into `buf` (see [`partial_len`]).
    #[inline]
    pub(crate) fn save(&self, buf: &mut [f32], rows: usize, dv: usize, dvp: usize) {
        let (ms, rest) = buf.split_at_mut(rows);
        let (ls, accs) = rest.split_at_mut(rows);
        ms.copy_from_slice(&self.m[..rows]);
        ls.copy_from_slice(&self.l[..rows]);
        for r in 0..rows {
            accs[r * dv..(r + 1) * dv].copy_from_slice(&self.acc[r * dvp..r * dvp + dv]);
        }
    }
}

/// Writes `acc / l` into `out` and returns the natural LSE; a row that saw nothing gets zeros
/// and −∞ (or its sink's logit). NaN in `l` (a NaN score the row read) propagates. A `sink`
/// (natural units) joins the denominator with no value: `out = acc / (l + e^sink)`.
#[inline]
pub(crate) fn finish_row(acc: &[f32], m: f32, l: f32, out: &mut [f32], sink: Option<f32>) -> f32 {
    let (m, l, keep) = with_sink(m, l, sink);
    if l > 0.0 || l.is_nan() {
        let inv = keep / l;
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = a * inv;
        }
        (m + l.log2()) * LN_2
    } else {
        out.fill(0.0);
        f32::NEG_INFINITY
    }
}

/// Folds a sink logit into a (base-2) running max and sum: returns the new max, the new sum,
/// and the factor the accumulated values keep (2^(m_old − m_new)).
#[inline]
pub(crate) fn with_sink(m: f32, l: f32, sink: Option<f32>) -> (f32, f32, f32) {
    match sink {
        None => (m, l, 1.0),
        Some(s) => {
            let s2 = s * std::f32::consts::LOG2_E;
            if m == f32::NEG_INFINITY || s2 > m {
                let keep = if m == f32::NEG_INFINITY { 0.0 } else { (m - s2).exp2() };
                (s2, l * keep + 1.0, keep)
            } else {
                (m, l + (s2 - m).exp2(), 1.0)
            }
        }
    }
}

/// Floats one partial state of `rows` rows takes: `m`, `l`, then `rows × dv` accumulators
/// (`None`: more than a 64-bit size holds).
pub(crate) fn partial_len(rows: usize, dv: usize) -> Option<usize> {
    rows.checked_mul(dv.checked_add(2)?)
}

/// Merges the partial states in `parts` (each [`partial_len`] floats) for row `r`: the state
/// of the union of their key ranges, as `(acc, m, l)` with `acc` written into `acc`.
pub(crate) fn merge_row(parts: &[&[f32]], rows: usize, dv: usize, r: usize, acc: &mut [f32]) -> (f32, f32) {
    let m = parts.iter().map(|p| p[r]).fold(f32::NEG_INFINITY, |a, b| if a > b { a } else { b });
    acc[..dv].fill(0.0);
    if m == f32::NEG_INFINITY {
        return (m, 0.0);
    }
    let mut l = 0.0;
    for p in parts {
        let (pm, pl) = (p[r], p[rows + r]);
        if pm == f32::NEG_INFINITY {
            continue;
        }
        let w = (pm - m).exp2();
        l += pl * w;
        let pacc = &p[2 * rows + r * dv..2 * rows + (r + 1) * dv];
        for (a, &x) in acc.iter_mut().zip(pacc) {
            *a += x * w;
        }
    }
    (m, l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::scalar::Scalar;

    /// Base-2 score of row `r` and key `j`: reproducible, with a fully masked key.
    fn score(r: usize, j: usize) -> f32 {
        if j == 3 {
            f32::NEG_INFINITY
        } else {
            ((r * 7 + j * 3) % 11) as f32 * 0.7 - 2.0
        }
    }

    #[test]
    fn transposed_and_row_major_tiles_update_alike() {
        let (rows, ld) = (3, 16);
        let (mut cols, mut by_rows) = (Online::new(rows, 0).unwrap(), Online::new(rows, 0).unwrap());
        cols.start(rows, 0);
        by_rows.start(rows, 0);
        let mut k0 = 0;
        for kn in [5, 9] {
            let mut t: Vec<f32> = (0..kn * rows).map(|i| score(i % rows, k0 + i / rows)).collect();
            let mut rm = vec![0f32; rows * ld];
            for r in 0..rows {
                for j in 0..kn {
                    rm[r * ld + j] = score(r, k0 + j);
                }
            }
            // SAFETY: `t` holds kn × rows floats, `rm` rows × ld with kn ≤ ld.
            unsafe {
                cols.update_cols::<Scalar>(&mut t, rows, rows, kn);
                by_rows.update_rows::<Scalar>(&mut rm, rows, ld, kn);
            }
            for r in 0..rows {
                assert_eq!((cols.m[r], cols.l[r], cols.alpha[r]), (by_rows.m[r], by_rows.l[r], by_rows.alpha[r]));
                for j in 0..kn {
                    assert_eq!(t[j * rows + r], rm[r * ld + j], "row {r} key {}", k0 + j);
                }
            }
            k0 += kn;
        }
    }

    /// Runs keys `k0..k1` of one row (value of key j: `[j, 1]`) through an `Online`.
    fn one_row(k0: usize, k1: usize) -> Online {
        let mut s = Online::new(1, 2).unwrap();
        s.start(1, 2);
        let mut st: Vec<f32> = (k0..k1).map(|j| score(0, j)).collect();
        // SAFETY: st holds k1 − k0 floats, one row.
        unsafe { s.update_rows::<Scalar>(&mut st, 1, k1 - k0, k1 - k0) };
        s.rescale(1, 2);
        for (j, p) in (k0..k1).zip(&st) {
            s.acc[0] += p * j as f32;
            s.acc[1] += p;
        }
        s
    }

    #[test]
    fn merged_partial_states_equal_one_pass() {
        let whole = one_row(0, 12);
        let mut bufs = vec![vec![0f32; partial_len(1, 2).unwrap()]; 3];
        for (buf, (k0, k1)) in bufs.iter_mut().zip([(0, 3), (3, 4), (4, 12)]) {
            one_row(k0, k1).save(buf, 1, 2, 2);
        }
        let parts: Vec<&[f32]> = bufs.iter().map(|b| &b[..]).collect();
        let mut acc = [0f32; 2];
        let (m, l) = merge_row(&parts, 1, 2, 0, &mut acc);
        let (mut a, mut b) = ([0f32; 2], [0f32; 2]);
        let lse_merged = finish_row(&acc, m, l, &mut a, Some(0.5));
        let lse_whole = whole.finish(0, 2, 2, &mut b, Some(0.5));
        assert!((lse_merged - lse_whole).abs() <= 1e-5, "{lse_merged} vs {lse_whole}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
        // A part that saw only a masked key leaves the merge unchanged.
        assert_eq!(one_row(3, 4).m[0], f32::NEG_INFINITY);
    }
}
