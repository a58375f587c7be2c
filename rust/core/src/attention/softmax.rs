//! Finishing online-softmax state: one row's output and LSE, and the exact merge of partial
//! states computed over disjoint key ranges (split-K decoding).
//!
//! Scores are in base 2 throughout the kernels (`m` is a base-2 max); the LSE handed out is
//! natural.

use std::f32::consts::LN_2;

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

/// Floats one partial state of `rows` rows takes: `m`, `l`, then `rows × dv` accumulators.
pub(crate) fn partial_len(rows: usize, dv: usize) -> usize {
    rows * (dv + 2)
}

/// Stores the state of a task's rows into `buf` (see [`partial_len`]).
pub(crate) fn save_partial(buf: &mut [f32], rows: usize, dv: usize, dvp: usize, sc: &super::blocked::Scratch) {
    let (ms, rest) = buf.split_at_mut(rows);
    let (ls, accs) = rest.split_at_mut(rows);
    ms.copy_from_slice(&sc.m[..rows]);
    ls.copy_from_slice(&sc.l[..rows]);
    for r in 0..rows {
        accs[r * dv..(r + 1) * dv].copy_from_slice(&sc.acc[r * dvp..r * dvp + dv]);
    }
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
