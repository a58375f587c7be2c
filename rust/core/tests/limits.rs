//! The edges of the entry points' inputs: zero heads, sizes beyond the machine or beyond a
//! 64-bit count, and thread counts beyond the bound. Each is a result or an `Error`, never a
//! panic, an abort or a wrapped size.

use ferroattn_core::{
    attention, attention_weights, linear_attention, padded_sequences, set_num_threads, Elems, ElemsMut, Error,
    FeatureMap, LinearParams, Params, Strided, StridedMut, MAX_THREADS,
};

/// A view of `data` (whose length is the last axis) repeated over the other axes of `shape`
/// through zero strides: any size is cheap to ask for.
fn repeated<'a>(data: &'a [f32], shape: [usize; 4]) -> Strided<'a> {
    assert_eq!(data.len(), shape[3]);
    Strided::new("q", Elems::F32(data), 0, shape, [0, 0, 0, 1]).unwrap()
}

fn contiguous(data: &[f32], shape: [usize; 4]) -> Strided<'_> {
    Strided::contiguous("x", Elems::F32(data), shape).unwrap()
}

fn memory_message<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::Memory(m)) => m,
        other => panic!("expected Error::Memory, got {other:?}"),
    }
}

#[test]
fn zero_query_heads_give_an_empty_result() {
    let x = vec![0.5f32; 2 * 2 * 4 * 8];
    let p = Params::new(0.3);
    let seqs = padded_sequences(2, 4, 4, None).unwrap();
    for hkv in [0, 1, 2] {
        let (q, k) = (contiguous(&[], [2, 0, 4, 8]), contiguous(&x[..2 * hkv * 4 * 8], [2, hkv, 4, 8]));
        let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut []), [2, 0, 4, 8]).unwrap();
        let mut lse: [f32; 0] = [];
        attention(&q, &k, &k, &mut out, Some(&mut lse), &seqs, &p).unwrap();
        attention_weights(&q, &k, &mut [], &seqs, &p).unwrap();
        let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut []), [2, 0, 4, 8]).unwrap();
        linear_attention(&q, &k, &k, &mut out, None, &LinearParams::new(true, FeatureMap::Elu1)).unwrap();
    }
    // Query heads without key/value heads are an error.
    let q = contiguous(&x[..2 * 4 * 8], [2, 1, 4, 8]);
    let k = contiguous(&[], [2, 0, 4, 8]);
    let mut y = vec![0f32; 2 * 4 * 8];
    let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut y), [2, 1, 4, 8]).unwrap();
    assert!(matches!(attention(&q, &k, &k, &mut out, None, &seqs, &p), Err(Error::Shape(_))));
    assert!(matches!(attention_weights(&q, &k, &mut [0.0; 32], &seqs, &p), Err(Error::Shape(_))));
    let lin = LinearParams::new(false, FeatureMap::Relu);
    assert!(matches!(linear_attention(&q, &k, &k, &mut out, None, &lin), Err(Error::Shape(_))));
}

#[test]
fn working_memory_beyond_the_machine_is_an_error() {
    // 2**20 query heads over one KV head, each a zero-stride repeat of one 2**20-wide row:
    // a task holds every head of the group, 2**40 floats of queries per worker.
    let (hq, d) = (1usize << 20, 1usize << 20);
    let row = vec![0.25f32; d];
    let (q, k) = (repeated(&row, [1, hq, 1, d]), repeated(&row, [1, 1, 1, d]));
    let v = contiguous(&[1.0], [1, 1, 1, 1]);
    let mut y = vec![0f32; hq];
    let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut y), [1, hq, 1, 1]).unwrap();
    let seqs = padded_sequences(1, 1, 1, None).unwrap();
    let m = memory_message(attention(&q, &k, &v, &mut out, None, &seqs, &Params::new(1.0)));
    assert!(m.starts_with("q, k and v (the kernels' working memory): cannot allocate"), "{m}");
}

#[test]
fn size_products_beyond_64_bits_are_errors_naming_the_dimensions() {
    // B·Hq·Nq·Nk = 2**64 weights: a wrapped product would ask for a buffer of 0.
    let row = [0.5f32; 8];
    let (q, k) = (repeated(&row, [1, 1 << 32, 1 << 32, 8]), repeated(&row, [1, 1, 1, 8]));
    let seqs = padded_sequences(1, 1 << 32, 1, None).unwrap();
    let m = memory_message(attention_weights(&q, &k, &mut [], &seqs, &Params::new(1.0)));
    assert!(m.contains("B·Hq·Nq·Nk"), "{m}");
    // A batch of 2**60 sequences cannot be listed.
    let m = memory_message(padded_sequences(1 << 60, 1, 1, None));
    assert!(m.contains("cannot allocate"), "{m}");
}

#[test]
fn thread_counts_beyond_the_bound_are_refused() {
    for n in [MAX_THREADS + 1, usize::MAX] {
        match set_num_threads(n) {
            Err(Error::Value(m)) => assert!(m.contains("at most 4096"), "{m}"),
            other => panic!("n = {n}: {other:?}"),
        }
    }
}
