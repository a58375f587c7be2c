//! Paged keys and values against the same keys and values gathered into a contiguous view:
//! shuffled and shared blocks, blocks of 1 to 64 tokens, decode steps split over the threads
//! (split-K parts that cross blocks), chunked prefill tiles, every storage type, and the checks
//! of the table. Run once per ISA with `FERROATTN_ISA=scalar|avx2|avx512`.

use ferroattn_core::{
    attention, attention_weights, padded_sequences, quantize_int8, set_num_threads, Elems, ElemsMut, Error, Params,
    Sequence, Strided, StridedMut,
};
use half::f16;

/// A small deterministic generator (xorshift), so the tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn float(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Store {
    F32,
    F16,
    I8,
}

/// int8 keys, their scales, int8 values, their scales.
type Int8Pair = (Vec<i8>, Vec<f32>, Vec<i8>, Vec<f32>);

/// A block cache `(blocks, bs, hkv, d)` (token-major, as vLLM stores it) and its table.
struct Cache {
    bs: usize,
    hkv: usize,
    d: usize,
    blocks: usize,
    per_row: usize,
    table: Vec<i32>,
    /// The values as stored (f16 and int8 rounded), f32, `(blocks, bs, hkv, d)`.
    k: Vec<f32>,
    v: Vec<f32>,
}

impl Cache {
    fn new(rng: &mut Rng, lens: &[usize], bs: usize, hkv: usize, d: usize) -> Cache {
        let need: Vec<usize> = lens.iter().map(|n| n.div_ceil(bs)).collect();
        let per_row = need.iter().max().copied().unwrap_or(0) + 1;
        let blocks = need.iter().sum::<usize>() + 2;
        // A shuffled order of blocks; unused entries -1.
        let mut ids: Vec<i32> = (0..blocks as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        let mut table = vec![-1; lens.len() * per_row];
        let mut at = 0;
        for (b, &n) in need.iter().enumerate() {
            table[b * per_row..b * per_row + n].copy_from_slice(&ids[at..at + n]);
            at += n;
        }
        // The second sequence shares the first one's first block (a common prefix).
        if lens.len() > 1 && need[0] > 1 && need[1] > 1 {
            table[per_row] = table[0];
        }
        let n = blocks * bs * hkv * d;
        Cache { bs, hkv, d, blocks, per_row, table, k: rng.vec(n), v: rng.vec(n) }
    }

    /// Rounds the stored values as `store` keeps them; returns the int8 data and scales.
    fn round(&mut self, store: Store) -> Option<Int8Pair> {
        match store {
            Store::F32 => None,
            Store::F16 => {
                for x in self.k.iter_mut().chain(self.v.iter_mut()) {
                    *x = f16::from_f32(*x).to_f32();
                }
                None
            }
            Store::I8 => {
                let d = self.d;
                let rows = self.k.len() / d;
                let mut out = vec![];
                for x in [&mut self.k, &mut self.v] {
                    let (mut q, mut s) = (vec![0i8; x.len()], vec![0f32; rows]);
                    quantize_int8(x, d, &mut q, &mut s).unwrap();
                    for (i, y) in x.iter_mut().enumerate() {
                        *y = q[i] as f32 * s[i / d];
                    }
                    out.push((q, s));
                }
                let (vq, vs) = out.pop().unwrap();
                let (kq, ks) = out.pop().unwrap();
                Some((kq, ks, vq, vs))
            }
        }
    }

    /// The rows of each sequence gathered into `(B, hkv, per_row · bs, d)` (zeros past its end).
    fn gather(&self, x: &[f32], lens: &[usize]) -> Vec<f32> {
        let (bs, hkv, d, n) = (self.bs, self.hkv, self.d, self.per_row * self.bs);
        let mut out = vec![0f32; lens.len() * hkv * n * d];
        for (b, &len) in lens.iter().enumerate() {
            for t in 0..len {
                let blk = self.table[b * self.per_row + t / bs] as usize;
                for h in 0..hkv {
                    let src = ((blk * bs + t % bs) * hkv + h) * d;
                    let dst = ((b * hkv + h) * n + t) * d;
                    out[dst..dst + d].copy_from_slice(&x[src..src + d]);
                }
            }
        }
        out
    }

    /// Strides of the cache viewed head-major per block: `(blocks, hkv, bs, d)`.
    fn strides(&self) -> [isize; 4] {
        let d = self.d as isize;
        [(self.bs * self.hkv) as isize * d, d, self.hkv as isize * d, 1]
    }

    fn shape(&self) -> [usize; 4] {
        [self.blocks, self.hkv, self.bs, self.d]
    }
}

/// Runs `q` (`(B, hq, nq, d)`) over the cache paged and over its gather; returns both outputs
/// and LSEs.
fn both(
    cache: &Cache,
    store: Store,
    q: &[f32],
    hq: usize,
    nq: usize,
    lens: &[usize],
    p: &Params,
) -> [(Vec<f32>, Vec<f32>); 2] {
    let mut cache_r = Cache { table: cache.table.clone(), k: cache.k.clone(), v: cache.v.clone(), ..*cache };
    let int8 = cache_r.round(store);
    let (b, d) = (lens.len(), cache.d);
    let seqs = padded_sequences(b, nq, cache.per_row * cache.bs, Some(lens)).unwrap();
    let qv = Strided::contiguous("q", Elems::F32(q), [b, hq, nq, d]).unwrap();
    let run = |k: &Strided, v: &Strided| {
        let mut out = vec![f32::NAN; b * hq * nq * d];
        let mut lse = vec![0f32; b * hq * nq];
        let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut out), [b, hq, nq, d]).unwrap();
        attention(&qv, k, v, &mut ov, Some(&mut lse), &seqs, p).unwrap();
        (out, lse)
    };
    let (kg, vg) = (cache_r.gather(&cache_r.k, lens), cache_r.gather(&cache_r.v, lens));
    let shape_g = [b, cache.hkv, cache.per_row * cache.bs, d];
    let want = run(
        &Strided::contiguous("k", Elems::F32(&kg), shape_g).unwrap(),
        &Strided::contiguous("v", Elems::F32(&vg), shape_g).unwrap(),
    );
    let (sh, st) = (cache.shape(), cache.strides());
    let (table, per_row) = (&cache.table[..], cache.per_row);
    let (k16, v16): (Vec<f16>, Vec<f16>) =
        (cache_r.k.iter().map(|&x| f16::from_f32(x)).collect(), cache_r.v.iter().map(|&x| f16::from_f32(x)).collect());
    let got = match (&int8, store) {
        (Some((kq, ks, vq, vs)), _) => {
            let sst = [st[0] / d as isize, 1, cache.hkv as isize];
            let kv = Strided::new("k", Elems::I8(kq), 0, sh, st).unwrap().with_scales("s", ks, 0, sst).unwrap();
            let vv = Strided::new("v", Elems::I8(vq), 0, sh, st).unwrap().with_scales("s", vs, 0, sst).unwrap();
            run(&paged(kv, table, per_row, b), &paged(vv, table, per_row, b))
        }
        (None, Store::F16) => run(
            &paged(Strided::new("k", Elems::F16(&k16), 0, sh, st).unwrap(), table, per_row, b),
            &paged(Strided::new("v", Elems::F16(&v16), 0, sh, st).unwrap(), table, per_row, b),
        ),
        _ => run(
            &paged(Strided::new("k", Elems::F32(&cache_r.k), 0, sh, st).unwrap(), table, per_row, b),
            &paged(Strided::new("v", Elems::F32(&cache_r.v), 0, sh, st).unwrap(), table, per_row, b),
        ),
    };
    [got, want]
}

/// `s` read through `table`.
fn paged<'s>(s: Strided<'s>, table: &'s [i32], per_row: usize, batch: usize) -> Strided<'s> {
    s.paged("k", table, per_row, batch).unwrap()
}

fn assert_close(got: &(Vec<f32>, Vec<f32>), want: &(Vec<f32>, Vec<f32>), tol: f32, what: &str) {
    for (name, g, w) in [("out", &got.0, &want.0), ("lse", &got.1, &want.1)] {
        for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
            let ok = (a == b) || (a - b).abs() <= tol * b.abs().max(1.0);
            assert!(ok, "{what}: {name}[{i}] = {a}, gathered {b}");
        }
    }
}

#[test]
fn paged_views_read_what_the_gather_holds() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let lens = [37usize, 130, 5, 64, 0];
    for store in [Store::F32, Store::F16, Store::I8] {
        for bs in [1usize, 3, 16, 64] {
            for (hq, hkv, d) in [(4, 2, 16), (2, 2, 32), (8, 1, 64)] {
                for nq in [1usize, 2, 9, 40] {
                    for causal in [true, false] {
                        let cache = Cache::new(&mut rng, &lens, bs, hkv, d);
                        let q = rng.vec(lens.len() * hq * nq * d);
                        let mut p = Params::new(0.3);
                        p.causal = causal;
                        let [got, want] = both(&cache, store, &q, hq, nq, &lens, &p);
                        // int8 on VNNI rounds queries and probabilities to 16 bits per tile,
                        // and tiles end at other keys when cut at blocks.
                        let tol = if store == Store::I8 { 2e-4 } else { 2e-6 };
                        assert_close(&got, &want, tol, &format!("bs {bs} hq {hq} d {d} nq {nq} causal {causal}"));
                    }
                }
            }
        }
    }
}

#[test]
fn split_k_parts_cross_blocks() {
    // One long sequence and one query: fewer tasks than threads, so the keys are split into
    // parts (multiples of the tile) that start and end inside blocks of 48 or 100 keys.
    set_num_threads(4).unwrap();
    let mut rng = Rng(7);
    for store in [Store::F32, Store::F16, Store::I8] {
        for bs in [16usize, 48, 100] {
            let lens = [3000usize];
            let cache = Cache::new(&mut rng, &lens, bs, 1, 32);
            let q = rng.vec(32 * 2);
            let mut p = Params::new(0.2);
            p.causal = true;
            p.window = (Some(1700), None);
            let [got, want] = both(&cache, store, &q, 2, 1, &lens, &p);
            assert_close(&got, &want, if store == Store::I8 { 2e-4 } else { 2e-6 }, &format!("bs {bs}"));
        }
    }
}

#[test]
fn table_entries_are_checked_before_any_kernel_runs() {
    let (bs, hkv, d) = (4usize, 1usize, 8usize);
    let k = vec![1f32; 3 * bs * hkv * d];
    let st = [(bs * hkv * d) as isize, d as isize, (hkv * d) as isize, 1];
    let table = [0, 2, -1, 1, 7, 9];
    let view = Strided::new("k", Elems::F32(&k), 0, [3, hkv, bs, d], st).unwrap().paged("k", &table, 3, 2).unwrap();
    assert_eq!(view.shape(), [2, 1, 12, 8]);
    let q = vec![1f32; 2 * 2 * d];
    let qv = Strided::contiguous("q", Elems::F32(&q), [2, 2, 1, d]).unwrap();
    let mut out = vec![0f32; 2 * 2 * d];
    let run = |lens: &[usize], out: &mut [f32]| {
        let mut ov = StridedMut::contiguous("out", ElemsMut::F32(out), [2, 2, 1, d]).unwrap();
        let seqs = padded_sequences(2, 1, 12, Some(lens)).unwrap();
        attention(&qv, &view, &view, &mut ov, None, &seqs, &Params::new(1.0))
    };
    run(&[8, 4], &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 1.0));
    let err = run(&[9, 4], &mut out).unwrap_err();
    assert!(matches!(&err, Error::Value(m) if m.contains("block_table[0, 2] = -1")), "{err:?}");
    let err = run(&[8, 5], &mut out).unwrap_err();
    assert!(matches!(&err, Error::Value(m) if m.contains("block_table[1, 1] = 7")), "{err:?}");
    // The weights never read paged keys; a paged view is paged once.
    let mut w = vec![0f32; 2 * 2 * 12];
    let seqs = padded_sequences(2, 1, 12, Some(&[8, 4])).unwrap();
    assert!(attention_weights(&qv, &view, &mut w, &seqs, &Params::new(1.0)).is_err());
    assert!(view.paged("k", &table, 3, 2).is_err());
    // A sequence whose keys start past the table is refused, not read.
    let past = [Sequence { batch: 0, q_start: 0, q_len: 1, k_start: 10, k_len: 4 }];
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut out), [2, 2, 1, d]).unwrap();
    assert!(attention(&qv, &view, &view, &mut ov, None, &past, &Params::new(1.0)).is_err());
}
