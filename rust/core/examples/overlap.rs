//! How well this machine overlaps arithmetic with a stream of memory reads: the ceiling for a
//! decode kernel whose arithmetic per byte is close to the time the byte takes to arrive.
//!
//! `cargo run --release -p ferroattn-core --example overlap -- [THREADS] [W ...]`
//!
//! `TILE_KIB` in the environment sets the tile of the tiled orders (default 16: a 128-key
//! tile of a 128-wide int8 head; a decode tile of f16 is 32 KiB, of f32 64 KiB).
//!
//! Two 128 MiB buffers stand for a cache's keys and values. Each 256-byte chunk is loaded and
//! followed by `W` rounds of 8 independent 8-lane FMAs (none of them waiting on memory). For
//! each `W` it prints, at `THREADS` threads (default 2, each taking half of every buffer):
//! - the arithmetic alone (chunks from a 16 KiB window that stays in L1);
//! - the reads alone (`W = 0`, keys and values interleaved);
//! - both, read as a decode step reads them: a tile of keys, then the tile of values,
//!   each stream requested 3 KiB ahead into L2 while it is read (as `Prefetch::ahead` does on
//!   Intel), then without those requests, then with keys and values interleaved chunk by chunk.
//!
//! Each figure is the best of 5 runs, a 1 GiB buffer read before each. "× max" is the time over
//! the larger of arithmetic alone and reads alone: 1.00 is perfect overlap, 2.00 none at all.

#[cfg(target_arch = "x86_64")]
mod support;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::support::buffer;
    use std::arch::x86_64::*;
    use std::time::Instant;

    const MIB: usize = 1 << 20;
    const CHUNK: usize = 256;
    const AHEAD: usize = 3 << 10;

    #[derive(Clone, Copy, PartialEq)]
    enum Order {
        /// A tile of keys, then the same tile of values.
        Tiles,
        /// A chunk of keys, then a chunk of values.
        Chunks,
    }

    #[derive(Clone, Copy)]
    struct Run {
        work: usize,
        order: Order,
        ahead: bool,
        /// Offsets wrap inside this window (all ones: the whole buffer).
        window: usize,
        /// Bytes of one stream read before switching to the other, in tile order.
        tile: usize,
    }

    /// Requests the 4 lines of the chunk at `p` into L2.
    #[inline(always)]
    fn request(p: *const u8) {
        for off in (0..CHUNK).step_by(64) {
            // SAFETY: a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off) as *const i8) };
        }
    }

    /// Loads one chunk into the accumulators, then `work` rounds of 8 FMAs.
    ///
    /// # Safety
    /// AVX2 and FMA are available; `p` holds 256 readable bytes.
    #[inline(always)]
    unsafe fn chunk(acc: &mut [__m256; 8], p: *const u8, work: usize, x: __m256) {
        // SAFETY: as the function's contract.
        unsafe {
            let mut l = [_mm256_setzero_ps(); 8];
            for (i, v) in l.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(p.add(32 * i) as *const f32);
            }
            for (a, v) in acc.iter_mut().zip(&l) {
                *a = _mm256_add_ps(*a, *v);
            }
            for _ in 0..work {
                for a in acc.iter_mut() {
                    *a = _mm256_fmadd_ps(*a, x, l[0]);
                }
            }
        }
    }

    /// One thread's pass over `k` and `v` (equal lengths, a multiple of the tile).
    ///
    /// # Safety
    /// AVX2 and FMA are available.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass(k: &[u8], v: &[u8], run: Run) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 8];
        let x = _mm256_set1_ps(0.999);
        let at = |b: &[u8], off: usize| b.as_ptr().wrapping_add(off & run.window);
        for t in (0..k.len()).step_by(run.tile) {
            // SAFETY: every offset is masked into the buffer (the window is a power of two
            // minus one, or all ones with offsets below the length); requests never fault.
            unsafe {
                match run.order {
                    Order::Chunks => {
                        for i in (t..t + run.tile).step_by(CHUNK) {
                            if run.ahead {
                                request(at(k, i + AHEAD / 2));
                                request(at(v, i + AHEAD / 2));
                            }
                            chunk(&mut acc, at(k, i), run.work, x);
                            chunk(&mut acc, at(v, i), run.work, x);
                        }
                    }
                    Order::Tiles => {
                        for b in [k, v] {
                            for i in (t..t + run.tile).step_by(CHUNK) {
                                if run.ahead {
                                    request(at(b, i + AHEAD));
                                }
                                chunk(&mut acc, at(b, i), run.work, x);
                            }
                        }
                    }
                }
            }
        }
        let mut lanes = [0f32; 8];
        for a in acc {
            let mut x = [0f32; 8];
            // SAFETY: 8 writable floats.
            unsafe { _mm256_storeu_ps(x.as_mut_ptr(), a) };
            lanes.iter_mut().zip(x).for_each(|(l, x)| *l += x);
        }
        lanes.iter().sum()
    }

    /// Bytes of each buffer one of `threads` threads reads: whole tiles, since the passes read
    /// tile by tile and must not run past a share's end.
    fn share(len: usize, threads: usize, tile: usize) -> usize {
        len / threads / tile * tile
    }

    /// Best of 5 runs over `threads` threads, each with its share of both buffers.
    fn time(k: &[u8], v: &[u8], threads: usize, run: Run, flush: &[u8]) -> f64 {
        let share = share(k.len(), threads, run.tile);
        (0..5)
            .map(|_| {
                std::hint::black_box(flush.iter().step_by(64).fold(0u8, |a, &b| a ^ b));
                let t0 = Instant::now();
                std::thread::scope(|s| {
                    for i in 0..threads {
                        let (k, v) = (&k[i * share..(i + 1) * share], &v[i * share..(i + 1) * share]);
                        // SAFETY: the features were checked in `main`.
                        s.spawn(move || std::hint::black_box(unsafe { pass(k, v, run) }));
                    }
                });
                t0.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    pub fn main() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            println!("overlap needs AVX2 and FMA");
            return;
        }
        let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
        let threads = args.first().copied().unwrap_or(2).max(1);
        let works = if args.len() > 1 { args[1..].to_vec() } else { vec![2, 4, 8] };
        let tile = std::env::var("TILE_KIB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(16) << 10;
        let bytes = 128 * MIB;
        if !tile.is_power_of_two() || share(bytes, threads, tile) == 0 {
            println!("TILE_KIB must be a power of two, at most a thread's share of 128 MiB");
            return;
        }
        let (k, v, flush) = (buffer(bytes, 1u8), buffer(bytes, 1u8), buffer(1024 * MIB, 1u8));
        let all = usize::MAX;
        let read_bytes = 2.0 * (share(bytes, threads, tile) * threads) as f64;
        let read = time(k, v, threads, Run { work: 0, order: Order::Chunks, ahead: false, window: all, tile }, flush);
        println!(
            "{threads} thread(s), 2 × {} MiB, tiles of {} KiB: reads alone {:.2} ms ({:.1} GB/s)",
            bytes / MIB,
            tile >> 10,
            read * 1e3,
            read_bytes / read / 1e9
        );
        for work in works {
            let alone = time(
                k,
                v,
                threads,
                Run { work, order: Order::Chunks, ahead: false, window: (16 << 10) - 1, tile },
                flush,
            );
            let max = alone.max(read);
            println!("W = {work}: arithmetic alone {:.2} ms ({:.2} of the reads)", alone * 1e3, alone / read);
            for (name, order, ahead) in [
                ("tiles, each stream requested ahead", Order::Tiles, true),
                ("tiles, no requests", Order::Tiles, false),
                ("chunks interleaved, requested ahead", Order::Chunks, true),
            ] {
                let t = time(k, v, threads, Run { work, order, ahead, window: all, tile }, flush);
                let gbs = read_bytes / t / 1e9;
                println!("  {name:<36} {:7.2} ms  {:5.1} GB/s  {:.2} × max", t * 1e3, gbs, t / max);
            }
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    x86::main();
    #[cfg(not(target_arch = "x86_64"))]
    println!("overlap measures x86-64 machines only");
}
