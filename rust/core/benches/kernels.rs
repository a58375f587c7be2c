//! Criterion micro-benchmarks of `ferroattn_core::attention`, on the core's thread pool at its
//! default size (all cores; `FERROATTN_NUM_THREADS=1` for one thread).
//!
//! ```sh
//! cargo bench -p ferroattn-core --bench kernels -- --quick    # a few seconds per shape
//! cargo bench -p ferroattn-core --bench kernels               # criterion's full sampling
//! FERROATTN_ISA=scalar cargo bench -p ferroattn-core --bench kernels -- --quick tile
//! ```
//!
//! Shapes (fp32, standard layout, non-causal):
//! * `tile/128x128_d64`: one tile, 128 queries × 128 keys, D=64, one head;
//! * `prefill/n1024_d64`: one head, N=1024, D=64;
//! * `decode/1x4096_d128`: one query × 4096 keys, D=128, one head.
//!
//! Throughput: prefill shapes count flops as elements (`4·Nq·Nk·D`; criterion's "Gelem/s" is
//! GFLOP/s); decode counts the bytes of K and V read (`2·Nk·D·4`), the quantity it is bound by.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferroattn_core::{attention, padded_sequences, Elems, ElemsMut, Params, Strided, StridedMut};

/// Deterministic inputs in [-1, 1) (xorshift), so the benchmark needs no extra crate.
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct Shape {
    group: &'static str,
    name: &'static str,
    nq: usize,
    nk: usize,
    d: usize,
    /// Throughput in bytes of K/V (decode) rather than flops (prefill).
    bytes: bool,
}

const SHAPES: [Shape; 3] = [
    Shape { group: "tile", name: "128x128_d64", nq: 128, nk: 128, d: 64, bytes: false },
    Shape { group: "prefill", name: "n1024_d64", nq: 1024, nk: 1024, d: 64, bytes: false },
    Shape { group: "decode", name: "1x4096_d128", nq: 1, nk: 4096, d: 128, bytes: true },
];

fn bench_attention(c: &mut Criterion) {
    for s in &SHAPES {
        let (qv, kv, vv) = (inputs(s.nq * s.d, 1), inputs(s.nk * s.d, 2), inputs(s.nk * s.d, 3));
        let mut ov = vec![0f32; s.nq * s.d];
        let seqs = padded_sequences(1, s.nq, s.nk, None).expect("sequences");
        let params = Params::new(1.0 / (s.d as f32).sqrt());
        let mut group = c.benchmark_group(s.group);
        group.throughput(if s.bytes {
            Throughput::Bytes((2 * s.nk * s.d * 4) as u64)
        } else {
            Throughput::Elements((4 * s.nq * s.nk * s.d) as u64)
        });
        group.bench_function(BenchmarkId::from_parameter(s.name), |b| {
            let q = Strided::contiguous("q", Elems::F32(&qv), [1, 1, s.nq, s.d]).expect("q");
            let k = Strided::contiguous("k", Elems::F32(&kv), [1, 1, s.nk, s.d]).expect("k");
            let v = Strided::contiguous("v", Elems::F32(&vv), [1, 1, s.nk, s.d]).expect("v");
            b.iter(|| {
                let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut ov), [1, 1, s.nq, s.d]).expect("out");
                attention(black_box(&q), &k, &v, &mut out, None, &seqs, &params).expect("attention");
                black_box(&mut out);
            });
        });
        group.finish();
    }
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
