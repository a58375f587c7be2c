//! Times one decode step (one query token, 32 query heads, head_dim 128, batch 1) against a
//! cache of `L` tokens, calling the core directly: a quick way to compare kernel variants
//! without building the Python extension. Most decode figures of `docs/performance.md` come
//! from it (two builds, or two variants behind a temporary environment switch, alternated).
//!
//! ```text
//! cargo bench -p ferroattn-core --bench decode_loop -- f32|f16|i8 KV_HEADS L [CALLS] [flush] [pause]
//! cargo bench -p ferroattn-core --bench decode_loop      # f32, f16, i8 at 8 KV heads, L = 32768, flush
//! ```
//!
//! Prints the median and best time per call and the K/V read rate at those times. With
//! `flush`, a 256 MiB buffer (`FLUSH_MIB` in the environment for another size) is read
//! before each call (as `benches/bench_decode.py` does); with `pause`, the program sleeps
//! 10 ms before each call (the threads go idle, as between the decode steps of a model);
//! without either, consecutive calls run back to back.
//! The cache is allocated on 2 MiB boundaries and, on Linux, advised to use huge pages, as
//! `ferroattn.KVCache` allocates its arrays.

use ferroattn_core::{attention, padded_sequences, Elems, ElemsMut, Params, Strided, StridedMut};
use half::f16;
use std::time::Instant;

const HQ: usize = 32;
const D: usize = 128;

/// A buffer laid out as `ferroattn.KVCache` lays out its arrays: 2 MiB aligned, with huge
/// pages requested where possible; freed when dropped.
struct Buffer<T> {
    ptr: *mut T,
    len: usize,
    layout: std::alloc::Layout,
}

impl<T: Copy> Buffer<T> {
    /// `n` elements set to `fill`.
    fn new(n: usize, fill: T) -> Self {
        let layout = std::alloc::Layout::from_size_align(n.max(1) * size_of::<T>(), 2 << 20).expect("layout");
        // SAFETY: the layout is non-zero in size; every element is written before any is read.
        unsafe {
            let ptr = std::alloc::alloc(layout) as *mut T;
            assert!(!ptr.is_null(), "out of memory");
            #[cfg(target_os = "linux")]
            {
                extern "C" {
                    fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
                }
                const MADV_HUGEPAGE: i32 = 14;
                madvise(ptr as *mut u8, layout.size(), MADV_HUGEPAGE);
            }
            for i in 0..n {
                ptr.add(i).write(fill);
            }
            Buffer { ptr, len: n, layout }
        }
    }
}

impl<T> std::ops::Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised elements for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> Drop for Buffer<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc` with this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr as *mut u8, self.layout) }
    }
}

fn main() {
    // `cargo bench` appends `--bench` (and criterion-style filters never apply here).
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if args.is_empty() {
        for dtype in ["f32", "f16", "i8"] {
            run(&[dtype, "8", "32768", "50", "flush"].map(String::from));
        }
    } else {
        run(&args);
    }
}

/// One configuration: `args` as in the usage line.
fn run(args: &[String]) {
    let usage = "usage: decode_loop f32|f16|i8 KV_HEADS L [CALLS] [flush] [pause]";
    let dtype = args.first().expect(usage).as_str();
    let hkv: usize = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let len: usize = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let calls: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let flush = args.iter().any(|a| a == "flush");
    let pause = args.iter().any(|a| a == "pause");

    let n = hkv * len * D;
    let q: Vec<f32> = (0..HQ * D).map(|i| (i as f32 * 0.37).sin()).collect();
    let qv = Strided::contiguous("q", Elems::F32(&q), [1, HQ, 1, D]).unwrap();
    let mut out = vec![0f32; HQ * D];
    let seqs = padded_sequences(1, 1, len, None).unwrap();
    let params = Params::new(1.0 / (D as f32).sqrt());
    let (k32, v32, k16, v16, k8, v8);
    // Separate key and value scales (int8), as `ferroattn.KVCache` keeps them.
    let (scales, vscales) = (Buffer::new(hkv * len, 0.01f32), Buffer::new(hkv * len, 0.02f32));
    let (kv, vv, bytes) = match dtype {
        "f32" => {
            (k32, v32) = (Buffer::new(n, 0.5f32), Buffer::new(n, 0.25f32));
            let k = Strided::contiguous("k", Elems::F32(&k32), [1, hkv, len, D]).unwrap();
            let v = Strided::contiguous("v", Elems::F32(&v32), [1, hkv, len, D]).unwrap();
            (k, v, 8 * n)
        }
        "f16" => {
            (k16, v16) = (Buffer::new(n, f16::from_f32(0.5)), Buffer::new(n, f16::from_f32(0.25)));
            let k = Strided::contiguous("k", Elems::F16(&k16), [1, hkv, len, D]).unwrap();
            let v = Strided::contiguous("v", Elems::F16(&v16), [1, hkv, len, D]).unwrap();
            (k, v, 4 * n)
        }
        "i8" => {
            (k8, v8) = (Buffer::new(n, 3i8), Buffer::new(n, -5i8));
            let st = [(hkv * len) as isize, len as isize, 1];
            let k = Strided::contiguous("k", Elems::I8(&k8), [1, hkv, len, D]).unwrap();
            let v = Strided::contiguous("v", Elems::I8(&v8), [1, hkv, len, D]).unwrap();
            let (k, v) = (k.with_scales("k", &scales, 0, st).unwrap(), v.with_scales("v", &vscales, 0, st).unwrap());
            (k, v, 2 * n + 8 * hkv * len)
        }
        _ => panic!("{usage}"),
    };
    let flush_mib: usize = std::env::var("FLUSH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let sink = Buffer::new(if flush { flush_mib << 18 } else { 0 }, 1.0f32);
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls {
        if flush {
            let s: f32 = sink.iter().step_by(16).sum();
            std::hint::black_box(s);
        }
        if pause {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let mut o = StridedMut::contiguous("out", ElemsMut::F32(&mut out), [1, HQ, 1, D]).unwrap();
        let t = Instant::now();
        attention(&qv, &kv, &vv, &mut o, None, &seqs, &params).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let (med, best) = (times[times.len() / 2], times[0]);
    let gbs = |t: f64| bytes as f64 / t / 1e9;
    println!(
        "{dtype} hkv={hkv} L={len}: median {:.3} ms ({:.1} GB/s), best {:.3} ms ({:.1} GB/s)",
        med * 1e3,
        gbs(med),
        best * 1e3,
        gbs(best)
    );
}
