//! The kernels against a naive f64 reference, over odd shapes, every mask, GQA, strided and
//! half-precision inputs. Run once per ISA with `FERROATTN_ISA=scalar|avx2|avx512`.

use ferroattn_core::{
    attention, attention_weights, padded_sequences, varlen_sequences, Align, Elems, ElemsMut, Params, Precision,
    Sequence, Strided, StridedMut,
};
use half::{bf16, f16};

/// A small deterministic generator (xorshift), so the tests need no extra crate.
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

/// Plain attention in f64 over contiguous `(B, H, N, D)` buffers; returns (out, lse).
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    [b, hq, nq, d]: [usize; 4],
    [hk, nk, dv]: [usize; 3],
    seqs: &[Sequence],
    p: &Params,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; b * hq * nq * dv];
    let mut lse = vec![f64::NEG_INFINITY; b * hq * nq];
    let g = hq / hk;
    for s in seqs {
        for h in 0..hq {
            for i in 0..s.q_len {
                let pos = match p.align {
                    Align::BottomRight => i as i64 + s.k_len as i64 - s.q_len as i64,
                    Align::TopLeft => i as i64,
                };
                let qi = ((s.batch * hq + h) * nq + s.q_start + i) * d;
                let mut scores = vec![];
                for j in 0..s.k_len {
                    let jj = j as i64;
                    let causal_ok = !p.causal || jj <= pos;
                    // In i128: sides up to usize::MAX are exact (beyond any sequence).
                    let (jw, pw) = (jj as i128, pos as i128);
                    let in_window = p.window.0.is_none_or(|l| jw >= pw - l as i128)
                        && p.window.1.is_none_or(|r| jw <= pw + r as i128);
                    let ok = causal_ok && (in_window || j < p.sink_keys);
                    if !ok {
                        continue;
                    }
                    let kj = ((s.batch * hk + h / g) * nk + s.k_start + j) * d;
                    let mut x: f64 = (0..d).map(|t| q[qi + t] as f64 * k[kj + t] as f64).sum::<f64>() * p.scale as f64;
                    if let Some(c) = p.softcap {
                        x = c as f64 * (x / c as f64).tanh();
                    }
                    scores.push((j, x));
                }
                if scores.is_empty() {
                    continue;
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s.1 - m).exp()).sum();
                let oi = ((s.batch * hq + h) * nq + s.q_start + i) * dv;
                for &(j, x) in &scores {
                    let w = (x - m).exp() / sum;
                    let vj = ((s.batch * hk + h / g) * nk + s.k_start + j) * dv;
                    for t in 0..dv {
                        out[oi + t] += w * v[vj + t] as f64;
                    }
                }
                lse[(s.batch * hq + h) * nq + s.q_start + i] = m + sum.ln();
            }
        }
    }
    (out, lse)
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

struct Case {
    b: usize,
    hq: usize,
    hk: usize,
    nq: usize,
    nk: usize,
    d: usize,
    dv: usize,
}

fn check(case: &Case, p: &Params, kv_lengths: Option<&[usize]>, seed: u64) {
    let Case { b, hq, hk, nq, nk, d, dv } = *case;
    let mut rng = Rng(seed * 2654435761 + 1);
    let q = rng.vec(b * hq * nq * d);
    let k = rng.vec(b * hk * nk * d);
    let v = rng.vec(b * hk * nk * dv);
    let seqs = padded_sequences(b, nq, nk, kv_lengths).unwrap();
    let (want, want_lse) = reference(&q, &k, &v, [b, hq, nq, d], [hk, nk, dv], &seqs, p);
    let mut got = vec![f32::NAN; b * hq * nq * dv];
    let mut lse = vec![0f32; b * hq * nq];
    let qv = Strided::contiguous("q", Elems::F32(&q), [b, hq, nq, d]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(&k), [b, hk, nk, d]).unwrap();
    let vv = Strided::contiguous("v", Elems::F32(&v), [b, hk, nk, dv]).unwrap();
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut got), [b, hq, nq, dv]).unwrap();
    attention(&qv, &kv, &vv, &mut ov, Some(&mut lse), &seqs, p).unwrap();
    let err = rel_err(&got, &want);
    assert!(err <= 1e-5 || want.iter().all(|&x| x == 0.0) && err == 0.0, "rel err {err} for {p:?}");
    for (&a, &w) in lse.iter().zip(&want_lse) {
        if w == f64::NEG_INFINITY {
            assert_eq!(a, f32::NEG_INFINITY);
        } else {
            assert!((a as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "lse {a} vs {w}");
        }
    }
    if !want.iter().all(|&x| x == 0.0) {
        assert!(got.iter().all(|x| x.is_finite()));
    }
}

fn masks() -> Vec<Params> {
    let mut out = vec![];
    for causal in [false, true] {
        for align in [Align::BottomRight, Align::TopLeft] {
            for window in [(None, None), (Some(3), Some(0)), (Some(20), None), (Some(5), Some(7)), (None, Some(2))] {
                for (softcap, sink_keys) in [(None, 0), (Some(2.5), 0), (None, 2), (None, 70)] {
                    let mut p = Params::new(0.37);
                    (p.causal, p.align, p.window, p.softcap, p.sink_keys) = (causal, align, window, softcap, sink_keys);
                    out.push(p);
                }
            }
        }
    }
    out
}

#[test]
fn matches_reference_over_shapes_and_masks() {
    let cases = [
        Case { b: 1, hq: 1, hk: 1, nq: 1, nk: 1, d: 1, dv: 1 },
        Case { b: 2, hq: 4, hk: 2, nq: 7, nk: 13, d: 7, dv: 5 },
        Case { b: 1, hq: 6, hk: 1, nq: 70, nk: 70, d: 32, dv: 32 },
        Case { b: 1, hq: 3, hk: 3, nq: 130, nk: 67, d: 80, dv: 16 },
        Case { b: 2, hq: 2, hk: 2, nq: 5, nk: 200, d: 64, dv: 64 },
    ];
    for (ci, case) in cases.iter().enumerate() {
        for (mi, p) in masks().iter().enumerate() {
            check(case, p, None, (ci * 100 + mi) as u64);
        }
    }
}

#[test]
fn window_sides_near_the_sequence_length_and_beyond_are_exact() {
    // A side as long as the sequence or longer hides nothing, up to usize::MAX (which must
    // not wrap to -1); shorter ones still hide keys.
    for (ci, (nq, nk)) in [(9, 3), (3, 9), (5, 5), (1, 130)].into_iter().enumerate() {
        let case = Case { b: 1, hq: 2, hk: 1, nq, nk, d: 8, dv: 8 };
        let span = nq.max(nk);
        let sides = [nk - 1, nk, nk + 1, span - 1, span, span + 1, 1 << 62, (1 << 63) - 1, 1 << 63, usize::MAX];
        for (si, side) in sides.into_iter().enumerate() {
            for window in [(Some(side), Some(0)), (Some(0), Some(side)), (Some(side), Some(side)), (Some(side), None)] {
                for (causal, align) in [(false, Align::BottomRight), (true, Align::BottomRight), (true, Align::TopLeft)]
                {
                    let mut p = Params::new(0.37);
                    (p.causal, p.align, p.window, p.sink_keys) = (causal, align, window, si % 2);
                    check(&case, &p, None, (ci * 100 + si) as u64);
                }
            }
        }
    }
}

#[test]
fn kv_lengths_limit_and_align() {
    let case = Case { b: 3, hq: 2, hk: 1, nq: 9, nk: 90, d: 16, dv: 16 };
    for p in masks() {
        check(&case, &p, Some(&[0, 90, 41]), 7);
    }
}

#[test]
fn varlen_matches_separate_sequences() {
    let (hq, hk, d) = (4, 2, 24);
    let cu_q = [0, 3, 3, 70];
    let cu_k = [0, 5, 9, 100];
    let mut rng = Rng(99);
    let q = rng.vec(hq * 70 * d);
    let k = rng.vec(hk * 100 * d);
    let v = rng.vec(hk * 100 * d);
    let seqs = varlen_sequences(&cu_q, &cu_k, 70, 100).unwrap();
    let mut p = Params::new(0.2);
    p.causal = true;
    let (want, _) = reference(&q, &k, &v, [1, hq, 70, d], [hk, 100, d], &seqs, &p);
    let mut got = vec![0f32; hq * 70 * d];
    let qv = Strided::contiguous("q", Elems::F32(&q), [1, hq, 70, d]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(&k), [1, hk, 100, d]).unwrap();
    let vv = Strided::contiguous("v", Elems::F32(&v), [1, hk, 100, d]).unwrap();
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut got), [1, hq, 70, d]).unwrap();
    attention(&qv, &kv, &vv, &mut ov, None, &seqs, &p).unwrap();
    assert!(rel_err(&got, &want) < 1e-5);
}

#[test]
fn strided_and_half_inputs() {
    // Token-major (B, N, H, D) memory read through strides, in f16 and bf16.
    let (b, h, n, d) = (2, 3, 45, 40);
    let mut rng = Rng(5);
    let raw: Vec<f32> = rng.vec(b * n * h * d * 3);
    let strides = [(n * h * d) as isize, d as isize, (h * d) as isize, 1];
    let part = |i: usize| &raw[i * b * n * h * d..(i + 1) * b * n * h * d];
    // f64 reference needs head-major copies.
    let to_bhsd = |x: &[f32]| {
        let mut y = vec![0f32; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for ni in 0..n {
                    for di in 0..d {
                        y[((bi * h + hi) * n + ni) * d + di] = x[((bi * n + ni) * h + hi) * d + di];
                    }
                }
            }
        }
        y
    };
    let mut p = Params::new(0.15);
    p.causal = true;
    let seqs = padded_sequences(b, n, n, None).unwrap();
    for dtype in ["f16", "bf16"] {
        let round = |x: &[f32]| -> Vec<f32> {
            x.iter()
                .map(|&v| if dtype == "f16" { f16::from_f32(v).to_f32() } else { bf16::from_f32(v).to_f32() })
                .collect()
        };
        let (qr, kr, vr) = (round(part(0)), round(part(1)), round(part(2)));
        let (want, _) = reference(&to_bhsd(&qr), &to_bhsd(&kr), &to_bhsd(&vr), [b, h, n, d], [h, n, d], &seqs, &p);
        let mut got = vec![0f32; b * h * n * d];
        if dtype == "f16" {
            let (q, k, v): (Vec<f16>, Vec<f16>, Vec<f16>) = (
                qr.iter().map(|&x| f16::from_f32(x)).collect(),
                kr.iter().map(|&x| f16::from_f32(x)).collect(),
                vr.iter().map(|&x| f16::from_f32(x)).collect(),
            );
            let mut o = vec![f16::ZERO; b * h * n * d];
            let view = |x| Strided::new("x", Elems::F16(x), 0, [b, h, n, d], strides).unwrap();
            let mut ov = StridedMut::new("out", ElemsMut::F16(&mut o), 0, [b, h, n, d], strides).unwrap();
            attention(&view(&q), &view(&k), &view(&v), &mut ov, None, &seqs, &p).unwrap();
            let o = to_bhsd(&o.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
            got.copy_from_slice(&o);
        } else {
            let (q, k, v): (Vec<bf16>, Vec<bf16>, Vec<bf16>) = (
                qr.iter().map(|&x| bf16::from_f32(x)).collect(),
                kr.iter().map(|&x| bf16::from_f32(x)).collect(),
                vr.iter().map(|&x| bf16::from_f32(x)).collect(),
            );
            let mut o = vec![bf16::ZERO; b * h * n * d];
            let view = |x| Strided::new("x", Elems::BF16(x), 0, [b, h, n, d], strides).unwrap();
            let mut ov = StridedMut::new("out", ElemsMut::BF16(&mut o), 0, [b, h, n, d], strides).unwrap();
            attention(&view(&q), &view(&k), &view(&v), &mut ov, None, &seqs, &p).unwrap();
            let o = to_bhsd(&o.iter().map(|x| x.to_f32()).collect::<Vec<_>>());
            got.copy_from_slice(&o);
        }
        let tol = if dtype == "f16" { 2e-3 } else { 1e-2 };
        let err = rel_err(&got, &want);
        assert!(err < tol, "{dtype}: {err}");
    }
}

#[test]
fn weights_are_the_softmax() {
    let (hq, hk, nq, nk, d) = (4, 2, 33, 70, 16);
    let mut rng = Rng(11);
    let q = rng.vec(hq * nq * d);
    let k = rng.vec(hk * nk * d);
    let mut p = Params::new(0.3);
    (p.causal, p.window) = (true, (Some(10), None));
    let seqs = padded_sequences(1, nq, nk, None).unwrap();
    // With V = identity rows, attention's output is the weights themselves.
    let v: Vec<f32> = (0..hk * nk * nk).map(|i| if i % nk == (i / nk) % nk { 1.0 } else { 0.0 }).collect();
    let (want, _) = reference(&q, &k, &v, [1, hq, nq, d], [hk, nk, nk], &seqs, &p);
    let mut w = vec![0f32; hq * nq * nk];
    let qv = Strided::contiguous("q", Elems::F32(&q), [1, hq, nq, d]).unwrap();
    let kv = Strided::contiguous("k", Elems::F32(&k), [1, hk, nk, d]).unwrap();
    attention_weights(&qv, &kv, &mut w, &seqs, &p).unwrap();
    assert!(rel_err(&w, &want) < 1e-5);
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let x = vec![0f32; 2 * 3 * 4 * 5];
    assert!(Strided::contiguous("q", Elems::F32(&x), [2, 3, 4, 6]).is_err());
    assert!(Strided::new("q", Elems::F32(&x), 0, [2, 3, 4, 5], [60, 20, 5, 2]).is_err());
    assert!(Strided::new("q", Elems::F32(&x), 0, [2, 3, 4, 5], [60, 20, -5, 1]).is_err());
    let mut y = vec![0f32; 20];
    assert!(StridedMut::new("out", ElemsMut::F32(&mut y), 0, [1, 1, 4, 5], [0, 0, 2, 1]).is_err());
    assert!(padded_sequences(2, 4, 4, Some(&[1])).is_err());
    assert!(padded_sequences(1, 4, 4, Some(&[5])).is_err());
    assert!(varlen_sequences(&[0, 3, 2], &[0, 1, 2], 2, 2).is_err());
    let q = Strided::contiguous("q", Elems::F32(&x), [2, 3, 4, 5]).unwrap();
    let k = Strided::contiguous("k", Elems::F32(&x[..40]), [2, 1, 4, 5]).unwrap();
    let mut o = vec![0f32; 120];
    let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut o), [2, 3, 4, 5]).unwrap();
    let seqs = padded_sequences(2, 4, 4, None).unwrap();
    // 3 query heads over 1 KV head is fine; a bad scale is not.
    assert!(attention(&q, &k, &k, &mut ov, None, &seqs, &Params::new(1.0)).is_ok());
    assert!(attention(&q, &k, &k, &mut ov, None, &seqs, &Params::new(f32::NAN)).is_err());
    let mut p = Params::new(1.0);
    p.softcap = Some(0.0);
    assert!(attention(&q, &k, &k, &mut ov, None, &seqs, &p).is_err());
    let k2 = Strided::contiguous("k", Elems::F32(&x[..80]), [2, 2, 4, 5]).unwrap();
    assert!(attention(&q, &k2, &k2, &mut ov, None, &seqs, &Params::new(1.0)).is_err());
}

/// Set in the child processes `isa_override_is_honoured` starts, so they do not start more.
const ISA_CHILD: &str = "FERROATTN_TEST_ISA_CHILD";

#[test]
fn isa_override_is_honoured() {
    use ferroattn_core::{cpu_features, Isa};
    let avail = Isa::available();
    let best = *avail.last().expect("scalar is always available");
    // The rule: a name of a path this CPU has picks that path; anything else (unset, empty,
    // unknown, a path this CPU lacks) gives the best path.
    let expected =
        |setting: Option<&str>| setting.and_then(Isa::from_name).filter(|isa| avail.contains(isa)).unwrap_or(best);

    // What holds on every CPU: the list is ordered lowest first, names round-trip, the detected
    // features back each listed path.
    assert_eq!(avail[0], Isa::Scalar);
    assert!(avail.windows(2).all(|w| w[0] < w[1]), "lowest first, each once: {avail:?}");
    for &isa in &avail {
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
        assert_eq!(Isa::from_name(&format!(" {} ", isa.name().to_uppercase())), Some(isa));
    }
    assert_eq!(Isa::from_name("portable"), Some(Isa::Scalar));
    assert_eq!(Isa::from_name("avx512f"), Some(Isa::Avx512));
    assert_eq!(Isa::from_name("NEON"), Some(Isa::Neon));
    for bad in ["", " ", "no-such-path", "avx", "avx512 f"] {
        assert_eq!(Isa::from_name(bad), None, "{bad:?}");
    }
    let features = cpu_features();
    let needs = [
        (Isa::Avx2, &["avx2", "fma", "f16c"][..]),
        (Isa::Avx512, &["avx2", "fma", "f16c", "avx512f"][..]),
        (Isa::Neon, &["neon"][..]),
    ];
    for (isa, flags) in needs {
        if avail.contains(&isa) {
            assert!(flags.iter().all(|f| features.contains(f)), "{isa:?} listed, features {features:?}");
        }
    }

    // This process: the path its own environment asks for (unset: the best one).
    let setting = std::env::var("FERROATTN_ISA").ok();
    assert_eq!(Isa::active(), expected(setting.as_deref()), "FERROATTN_ISA={setting:?}");

    // `Isa::active` is fixed at its first call, so each other setting runs this test again in a
    // child process of this test binary.
    if std::env::var_os(ISA_CHILD).is_some() {
        return;
    }
    let names = ["", "no-such-path", "scalar", "portable", "avx2", "AVX512", "avx512f", "neon"];
    let settings = std::iter::once(None).chain(names.map(Some));
    for setting in settings {
        let exe = std::env::current_exe().expect("the test binary's path");
        // Under emulation (qemu-user runs this binary for another architecture) the child must
        // be started through the emulator too: FERROATTN_TEST_RUNNER names it.
        let mut child = match std::env::var("FERROATTN_TEST_RUNNER") {
            Ok(runner) if !runner.trim().is_empty() => {
                let mut c = std::process::Command::new(runner.trim());
                c.arg(exe);
                c
            }
            _ => std::process::Command::new(exe),
        };
        child.args(["--exact", "isa_override_is_honoured", "--test-threads=1"]).env(ISA_CHILD, "1");
        match setting {
            Some(name) => child.env("FERROATTN_ISA", name),
            None => child.env_remove("FERROATTN_ISA"),
        };
        let out = child.output().expect("the test binary runs again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(" 1 passed"),
            "FERROATTN_ISA={setting:?} (expecting {:?}):\n{stdout}{}",
            expected(setting),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Prints the path the kernels run on and the CPU's features (visible with `--show-output`), and
/// checks them against `FERROATTN_EXPECT_ISA` and `FERROATTN_EXPECT_FEATURES` (space-separated;
/// `-name` for a feature that must be absent) where set, so a run under emulation proves which
/// path and which dispatch branches it exercised.
#[test]
fn active_path_is_reported_and_as_expected() {
    use ferroattn_core::{cpu_features, Isa};
    let (isa, features) = (Isa::active(), cpu_features());
    println!("kernel path: {} (available: {:?}); CPU features: {features:?}", isa.name(), Isa::available());
    if let Ok(want) = std::env::var("FERROATTN_EXPECT_ISA") {
        assert_eq!(isa.name(), want.trim(), "features {features:?}");
    }
    for f in std::env::var("FERROATTN_EXPECT_FEATURES").unwrap_or_default().split_whitespace() {
        match f.strip_prefix('-') {
            Some(absent) => assert!(!features.contains(&absent), "{absent} reported: {features:?}"),
            None => assert!(features.contains(&f), "{f} missing: {features:?}"),
        }
    }
}

#[test]
fn decode_shapes_split_keys_and_few_rows() {
    // Few query rows against long caches: the dot-product score path and split-K with merge.
    let cases = [
        Case { b: 1, hq: 8, hk: 2, nq: 1, nk: 3000, d: 64, dv: 64 },
        Case { b: 1, hq: 4, hk: 4, nq: 2, nk: 2500, d: 37, dv: 19 },
        Case { b: 2, hq: 6, hk: 1, nq: 1, nk: 1800, d: 128, dv: 128 },
        Case { b: 1, hq: 2, hk: 1, nq: 3, nk: 2100, d: 8, dv: 8 },
    ];
    for (ci, case) in cases.iter().enumerate() {
        for (mi, p) in masks().iter().enumerate().step_by(3) {
            check(case, p, None, (ci * 1000 + mi) as u64);
        }
        let lens: Vec<usize> = (0..case.b).map(|i| [case.nk, 700, 0][i % 3]).collect();
        check(case, &masks()[4], Some(&lens), ci as u64);
    }
}

#[test]
fn int8_and_half_keys_with_f32_queries() {
    // A cache stores keys/values in a narrow type while queries stay f32: the kernel converts
    // rows itself and must equal the reference on the stored (dequantized) values. A head of 24
    // takes the float products everywhere; one of 64 the integer ones where the CPU has them
    // (VNNI, `sdot`), whose queries rounded to 16 bits add up to ~1e-4.
    int8_and_half_keys(24, 1e-5);
    int8_and_half_keys(64, 2e-4);
}

fn int8_and_half_keys(d: usize, tol: f64) {
    let (b, hq, hk, nq, nk) = (1, 4, 2, 3, 300);
    let mut rng = Rng(21);
    let q = rng.vec(b * hq * nq * d);
    let kf = rng.vec(b * hk * nk * d);
    let vf = rng.vec(b * hk * nk * d);
    let quant = |x: &[f32]| -> (Vec<i8>, Vec<f32>, Vec<f32>) {
        let (mut qs, mut scales, mut back) = (vec![], vec![], vec![]);
        for row in x.chunks(d) {
            let s = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            scales.push(s);
            for &v in row {
                let iv = (v / s).round().clamp(-127.0, 127.0) as i8;
                qs.push(iv);
                back.push(iv as f32 * s);
            }
        }
        (qs, scales, back)
    };
    let (k8, ks, kback) = quant(&kf);
    let (v8, vs, vback) = quant(&vf);
    let mut p = Params::new(0.2);
    p.causal = true;
    let seqs = padded_sequences(b, nq, nk, None).unwrap();
    let (want, _) = reference(&q, &kback, &vback, [b, hq, nq, d], [hk, nk, d], &seqs, &p);
    let qv = Strided::contiguous("q", Elems::F32(&q), [b, hq, nq, d]).unwrap();
    let scale_strides = [(hk * nk) as isize, nk as isize, 1];
    let kv = Strided::contiguous("k", Elems::I8(&k8), [b, hk, nk, d])
        .unwrap()
        .with_scales("ks", &ks, 0, scale_strides)
        .unwrap();
    let vv = Strided::contiguous("v", Elems::I8(&v8), [b, hk, nk, d])
        .unwrap()
        .with_scales("vs", &vs, 0, scale_strides)
        .unwrap();
    let run = |kv: &Strided, vv: &Strided| {
        let mut got = vec![0f32; b * hq * nq * d];
        let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut got), [b, hq, nq, d]).unwrap();
        attention(&qv, kv, vv, &mut ov, None, &seqs, &p).map(|_| got)
    };
    assert!(rel_err(&run(&kv, &vv).unwrap(), &want) < tol, "d {d}");

    // Without scales int8 is refused, not read as garbage.
    let bare = Strided::contiguous("k", Elems::I8(&k8), [b, hk, nk, d]).unwrap();
    assert!(run(&bare, &bare).is_err());

    // f16 keys/values under f32 queries.
    let kh: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
    let vh: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
    let kr: Vec<f32> = kh.iter().map(|x| x.to_f32()).collect();
    let vr: Vec<f32> = vh.iter().map(|x| x.to_f32()).collect();
    let (want, _) = reference(&q, &kr, &vr, [b, hq, nq, d], [hk, nk, d], &seqs, &p);
    let kv = Strided::contiguous("k", Elems::F16(&kh), [b, hk, nk, d]).unwrap();
    let vv = Strided::contiguous("v", Elems::F16(&vh), [b, hk, nk, d]).unwrap();
    assert!(rel_err(&run(&kv, &vv).unwrap(), &want) < 1e-5);
}

/// Runs bf16 q, k, v (the values of `q`, `k`, `v` rounded) and returns the output as f32.
fn run_bf16(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    qs: [usize; 4],
    ks: [usize; 3],
    seqs: &[Sequence],
    p: &Params,
) -> Vec<f32> {
    let [b, hq, nq, d] = qs;
    let [hk, nk, dv] = ks;
    let to = |x: &[f32]| x.iter().map(|&y| bf16::from_f32(y)).collect::<Vec<_>>();
    let (q, k, v) = (to(q), to(k), to(v));
    let mut o = vec![bf16::ZERO; b * hq * nq * dv];
    let qv = Strided::contiguous("q", Elems::BF16(&q), [b, hq, nq, d]).unwrap();
    let kv = Strided::contiguous("k", Elems::BF16(&k), [b, hk, nk, d]).unwrap();
    let vv = Strided::contiguous("v", Elems::BF16(&v), [b, hk, nk, dv]).unwrap();
    let mut ov = StridedMut::contiguous("out", ElemsMut::BF16(&mut o), [b, hq, nq, dv]).unwrap();
    attention(&qv, &kv, &vv, &mut ov, None, seqs, p).unwrap();
    o.iter().map(|x| x.to_f32()).collect()
}

#[test]
fn bf16_products_and_lower_precisions_over_odd_shapes_and_gqa() {
    // Many query rows (the blocked step that bf16 products take), odd head dims and key
    // counts (pairs padded with zero), GQA groups, a key count past one tile. On a CPU
    // without bf16 dot products (or FERROATTN_BF16DOT=0) the f32 kernels meet the same bounds.
    let shapes = [(1, 4, 2, 40, 131, 59, 40), (2, 3, 1, 33, 257, 128, 128), (1, 2, 2, 20, 19, 7, 9)];
    for (i, &(b, hq, hk, nq, nk, d, dv)) in shapes.iter().enumerate() {
        for causal in [false, true] {
            let mut p = Params::new(1.0 / (d as f32).sqrt());
            p.causal = causal;
            let mut rng = Rng(91 + i as u64);
            let q = rng.vec(b * hq * nq * d);
            let k = rng.vec(b * hk * nk * d);
            let v = rng.vec(b * hk * nk * dv);
            let seqs = padded_sequences(b, nq, nk, None).unwrap();
            let round = |x: &[f32]| x.iter().map(|&y| bf16::from_f32(y).to_f32()).collect::<Vec<_>>();
            // bf16: P rounded to bf16 before P·V (2^-9 per weight) and the bf16 output (2^-9).
            let (qr, kr, vr) = (round(&q), round(&k), round(&v));
            let (want, _) = reference(&qr, &kr, &vr, [b, hq, nq, d], [hk, nk, dv], &seqs, &p);
            let err = rel_err(&run_bf16(&q, &k, &v, [b, hq, nq, d], [hk, nk, dv], &seqs, &p), &want);
            assert!(err < 5e-3, "bf16 {:?} causal {causal}: {err}", shapes[i]);
            // f32 at lower precisions, against the f32 inputs' reference.
            let (want, _) = reference(&q, &k, &v, [b, hq, nq, d], [hk, nk, dv], &seqs, &p);
            for (precision, tol) in [(Precision::High, 1e-5), (Precision::Medium, 1e-2)] {
                p.precision = precision;
                let mut got = vec![0f32; b * hq * nq * dv];
                let qv = Strided::contiguous("q", Elems::F32(&q), [b, hq, nq, d]).unwrap();
                let kv = Strided::contiguous("k", Elems::F32(&k), [b, hk, nk, d]).unwrap();
                let vv = Strided::contiguous("v", Elems::F32(&v), [b, hk, nk, dv]).unwrap();
                let mut ov = StridedMut::contiguous("out", ElemsMut::F32(&mut got), [b, hq, nq, dv]).unwrap();
                attention(&qv, &kv, &vv, &mut ov, None, &seqs, &p).unwrap();
                let err = rel_err(&got, &want);
                assert!(err <= tol, "{precision:?} {:?} causal {causal}: {err}", shapes[i]);
            }
        }
    }
}
