//! Biases, masks, block-sparse layouts and sinks against a naive f64 reference.

use ferroattn_core::{
    attention_weights_with, attention_with, padded_sequences, BlockLayout, Dense, Elems, ElemsMut, Params, RelBias,
    Strided, StridedMut, Variants,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

const B: usize = 2;
const HQ: usize = 4;
const HK: usize = 2;
const NQ: usize = 37;
const NK: usize = 150;
const D: usize = 16;

/// T5's bucket, written independently of the crate's.
fn t5_bucket(rel: i64, bidirectional: bool, num_buckets: i64, max_distance: i64) -> usize {
    let mut nb = num_buckets;
    let mut out = 0;
    let mut n = rel;
    if bidirectional {
        nb /= 2;
        if n > 0 {
            out += nb;
        }
        n = n.abs();
    } else {
        n = -n.min(0);
    }
    let max_exact = nb / 2;
    if n < max_exact {
        return (out + n) as usize;
    }
    let large = max_exact
        + ((n as f64 / max_exact as f64).ln() / (max_distance as f64 / max_exact as f64).ln() * (nb - max_exact) as f64)
            as i64;
    (out + large.min(nb - 1)) as usize
}

/// Reference: score(b,h,i,j) = scale·q·k + bias_fn; visible_fn masks; optional sink.
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    causal: bool,
    bias_fn: &dyn Fn(usize, usize, usize, usize) -> f64,
    visible_fn: &dyn Fn(usize, usize, usize, usize) -> bool,
    sinks: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; B * HQ * NQ * D];
    let mut lse = vec![f64::NEG_INFINITY; B * HQ * NQ];
    for b in 0..B {
        for h in 0..HQ {
            for i in 0..NQ {
                let pos = i + NK - NQ;
                let mut s = vec![];
                for j in 0..NK {
                    if (causal && j > pos) || !visible_fn(b, h, i, j) {
                        continue;
                    }
                    let (qi, kj) = (((b * HQ + h) * NQ + i) * D, ((b * HK + h / 2) * NK + j) * D);
                    let dot: f64 = (0..D).map(|t| q[qi + t] as f64 * k[kj + t] as f64).sum();
                    s.push((j, dot * 0.25 + bias_fn(b, h, i, j)));
                }
                let sink = sinks.map(|x| x[h] as f64);
                let m = s.iter().map(|x| x.1).chain(sink).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let z: f64 = s.iter().map(|x| (x.1 - m).exp()).sum::<f64>() + sink.map_or(0.0, |x| (x - m).exp());
                let o = ((b * HQ + h) * NQ + i) * D;
                for &(j, x) in &s {
                    let w = (x - m).exp() / z;
                    for t in 0..D {
                        out[o + t] += w * v[((b * HK + h / 2) * NK + j) * D + t] as f64;
                    }
                }
                lse[(b * HQ + h) * NQ + i] = m + z.ln();
            }
        }
    }
    (out, lse)
}

fn run(q: &[f32], k: &[f32], v: &[f32], causal: bool, variants: &Variants) -> (Vec<f32>, Vec<f32>) {
    let mut p = Params::new(0.25);
    p.causal = causal;
    let qv = Strided::contiguous("q", Elems::F32(q), [B, HQ, NQ, D]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(k), [B, HK, NK, D]).unwrap();
    let vv = Strided::contiguous("v", Elems::F32(v), [B, HK, NK, D]).unwrap();
    let mut out = vec![0f32; B * HQ * NQ * D];
    let mut lse = vec![0f32; B * HQ * NQ];
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut out), [B, HQ, NQ, D]).unwrap();
    let seqs = padded_sequences(B, NQ, NK, None).unwrap();
    attention_with(&qv, &kv, &vv, &mut ov, Some(&mut lse), &seqs, &p, variants).unwrap();
    (out, lse)
}

fn check(got: &(Vec<f32>, Vec<f32>), want: &(Vec<f64>, Vec<f64>)) {
    let num: f64 = got.0.iter().zip(&want.0).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = want.0.iter().map(|b| b * b).sum();
    assert!((num / den).sqrt() < 1e-5, "rel err {}", (num / den).sqrt());
    for (&a, &w) in got.1.iter().zip(&want.1) {
        if w == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY);
        } else {
            assert!((a as f64 - w).abs() < 1e-5 * w.abs().max(1.0), "lse {a} vs {w}");
        }
    }
}

fn inputs() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = Rng(7);
    (rng.vec(B * HQ * NQ * D), rng.vec(B * HK * NK * D), rng.vec(B * HK * NK * D))
}

#[test]
fn dense_bias_and_mask_broadcast() {
    let (q, k, v) = inputs();
    let mut rng = Rng(3);
    // Bias shared over the batch (stride 0), mask shared over heads.
    let bias = rng.vec(HQ * NQ * NK);
    let mask: Vec<u8> = (0..B * NQ * NK).map(|i| (rng.next() > -0.6 || i % 7 == 0) as u8).collect();
    let variants = Variants {
        bias: Some(Dense::new("bias", &bias, 0, [B, HQ, NQ, NK], [0, (NQ * NK) as isize, NK as isize, 1]).unwrap()),
        mask: Some(Dense::new("mask", &mask, 0, [B, HQ, NQ, NK], [(NQ * NK) as isize, 0, NK as isize, 1]).unwrap()),
        ..Variants::default()
    };
    for causal in [false, true] {
        let want = reference(
            &q,
            &k,
            &v,
            causal,
            &|_, h, i, j| bias[(h * NQ + i) * NK + j] as f64,
            &|b, _, i, j| mask[(b * NQ + i) * NK + j] != 0,
            None,
        );
        check(&run(&q, &k, &v, causal, &variants), &want);
    }
}

#[test]
fn alibi_rel_bias_and_sinks() {
    let (q, k, v) = inputs();
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    let sinks = [0.3f32, -1.0, 2.0, 0.0];
    let mut rng = Rng(11);
    let table = rng.vec(32 * HQ);
    for bidirectional in [true, false] {
        let rel = RelBias { table: &table, num_buckets: 32, max_distance: 128, bidirectional };
        let variants =
            Variants { alibi_slopes: Some(&slopes), sinks: Some(&sinks), rel_bias: Some(rel), ..Variants::default() };
        let want = reference(
            &q,
            &k,
            &v,
            true,
            &|_, h, i, j| {
                let pos = (i + NK - NQ) as i64;
                -(slopes[h] as f64) * (pos - j as i64).abs() as f64
                    + table[t5_bucket(j as i64 - pos, bidirectional, 32, 128) * HQ + h] as f64
            },
            &|_, _, _, _| true,
            Some(&sinks),
        );
        check(&run(&q, &k, &v, true, &variants), &want);
    }
}

#[test]
fn block_sparse_equals_the_equivalent_mask_and_weights_sum_below_one_with_sinks() {
    let (q, k, v) = inputs();
    let bs = 16;
    let (qb, kb) = (NQ.div_ceil(bs), NK.div_ceil(bs));
    let layout: Vec<u8> = (0..HQ * qb * kb).map(|i| (i % 3 != 1) as u8).collect();
    let variants = Variants {
        blocks: Some(BlockLayout { layout: &layout, heads: HQ, block: bs, q_blocks: qb, k_blocks: kb }),
        ..Variants::default()
    };
    let want = reference(
        &q,
        &k,
        &v,
        false,
        &|_, _, _, _| 0.0,
        &|_, h, i, j| layout[(h * qb + i / bs) * kb + j / bs] != 0,
        None,
    );
    check(&run(&q, &k, &v, false, &variants), &want);

    // Weights with a sink: rows sum to 1 − the sink's share.
    let sinks = [1.0f32; HQ];
    let variants = Variants { sinks: Some(&sinks), ..Variants::default() };
    let qv = Strided::contiguous("q", Elems::F32(&q), [B, HQ, NQ, D]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(&k), [B, HK, NK, D]).unwrap();
    let mut w = vec![0f32; B * HQ * NQ * NK];
    let seqs = padded_sequences(B, NQ, NK, None).unwrap();
    attention_weights_with(&qv, &kv, &mut w, &seqs, &Params::new(0.25), &variants).unwrap();
    let (_, lse) = run(&q, &k, &v, false, &variants);
    for (row, l) in w.chunks(NK).zip(&lse) {
        let sum: f32 = row.iter().sum();
        let sink_share = (1.0f32 - l).exp();
        assert!((sum + sink_share - 1.0).abs() < 1e-5, "{sum} + {sink_share}");
    }
}

#[test]
fn bad_variants_are_errors() {
    let (q, k, v) = inputs();
    let short = [1.0f32; 3];
    let mut p = Params::new(0.25);
    p.causal = true;
    let qv = Strided::contiguous("q", Elems::F32(&q), [B, HQ, NQ, D]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(&k), [B, HK, NK, D]).unwrap();
    let vv = Strided::contiguous("v", Elems::F32(&v), [B, HK, NK, D]).unwrap();
    let mut out = vec![0f32; B * HQ * NQ * D];
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut out), [B, HQ, NQ, D]).unwrap();
    let seqs = padded_sequences(B, NQ, NK, None).unwrap();
    for variants in [
        Variants { alibi_slopes: Some(&short), ..Variants::default() },
        Variants { sinks: Some(&[f32::NAN; HQ]), ..Variants::default() },
        Variants {
            blocks: Some(BlockLayout { layout: &[1; 4], heads: 1, block: 16, q_blocks: 2, k_blocks: 2 }),
            ..Variants::default()
        },
    ] {
        assert!(attention_with(&qv, &kv, &vv, &mut ov, None, &seqs, &p, &variants).is_err());
    }
    assert!(Dense::new("bias", &short, 0, [1, 1, 2, 2], [0, 0, 2, 1]).is_err());
}
