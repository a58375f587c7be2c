//! ferroattn-core: scaled-dot-product attention on the CPU.
//!
//! Flash-style blocked kernels (tiles of queries × tiles of keys with an online softmax, so no
//! `N×N` matrix is ever held), SIMD inner loops chosen at run time, and rayon over independent
//! tiles on a private pool. Inputs are strided views in f32, f16 or bf16; arithmetic is f32.
//!
//! This crate knows nothing of Python: the binding crate only converts arrays and errors.
//!
//! ```
//! use ferroattn_core::{attention, padded_sequences, Elems, ElemsMut, Params, Strided, StridedMut};
//! let (n, d) = (5, 8);
//! let x: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = Strided::contiguous("q", Elems::F32(&x), [1, 1, n, d]).unwrap();
//! let mut y = vec![0.0f32; n * d];
//! let mut out = StridedMut::contiguous("out", ElemsMut::F32(&mut y), [1, 1, n, d]).unwrap();
//! let mut params = Params::new(1.0 / (d as f32).sqrt());
//! params.causal = true;
//! attention(&q, &q, &q, &mut out, None, &padded_sequences(1, n, n, None).unwrap(), &params).unwrap();
//! // The first query sees only the first key, so it returns the first value.
//! assert!((y[0] - x[0]).abs() < 1e-6);
//! ```

mod attention;
mod error;
mod gemm;
mod layout;
mod linear;
mod mask;
mod memory;
mod paged;
mod parallel;
mod precision;
mod quant;
mod simd;
mod variants;

pub use attention::{attention, attention_scratch_bytes, attention_weights, attention_weights_with, attention_with};
pub use error::{Error, Result};
pub use layout::{DType, Elems, ElemsMut, Extent, Strided, StridedMut};
pub use linear::{linear_attention, linear_scratch_bytes, FeatureMap, LinearParams, LinearState};
pub use mask::{padded_sequences, varlen_sequences, Align, Params, Sequence};
pub use parallel::{forget_pool_after_fork, num_threads, set_num_threads, MAX_THREADS};
pub use precision::Precision;
pub use quant::quantize_int8;
pub use simd::{bf16_dot, cpu_features, stream_requests, Isa};
pub use variants::{BlockLayout, Dense, RelBias, Variants};
