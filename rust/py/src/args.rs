//! The option groups of a call, as the typed objects the Python package passes: each struct
//! names the Python class it is read from, field for field (by attribute), so an option added
//! to a group is one field on each side.

use ferroattn_core as core;
use numpy::{PyReadonlyArray1, PyUntypedArray};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;

/// `ferroattn._args.MaskOptions`: how scores are scaled and what a query may see.
#[derive(FromPyObject)]
pub(crate) struct MaskArgs {
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    /// Causal alignment: query `i` at position `i` (else `i + k_len − q_len`).
    top_left: bool,
    window_left: Option<usize>,
    window_right: Option<usize>,
    /// Leading keys the window does not hide (StreamingLLM's sink keys).
    sink_keys: usize,
    /// How float32 products are taken ("highest", "high", "medium"; see `core::Precision`).
    precision: PyBackedStr,
}

impl MaskArgs {
    pub(crate) fn params(&self) -> core::Params {
        let mut params = core::Params::new(self.scale as f32);
        params.softcap = self.softcap.map(|c| c as f32);
        params.causal = self.causal;
        params.align = if self.top_left { core::Align::TopLeft } else { core::Align::BottomRight };
        params.window = (self.window_left, self.window_right);
        params.sink_keys = self.sink_keys;
        // The Python layer validated the name; anything else keeps f32 products.
        params.precision = core::Precision::from_name(&self.precision).unwrap_or_default();
        params
    }
}

/// `ferroattn._args.Sequences`: which queries see which keys. At most one description is
/// given; none means every query of batch entry `b` sees every key of it.
#[derive(FromPyObject)]
pub(crate) struct SequenceArgs {
    /// Valid keys per batch entry (right padding).
    kv_lengths: Option<Vec<usize>>,
    /// Packed sequences: the cumulative query and key lengths (flash-attn's varlen).
    cu_seqlens_q: Option<Vec<usize>>,
    cu_seqlens_k: Option<Vec<usize>>,
    /// Sequences spelled out.
    explicit: Option<Vec<SpanArgs>>,
}

/// One explicit sequence, a tuple `(batch, q_start, q_len, k_start, k_len)`.
#[derive(FromPyObject)]
struct SpanArgs(usize, usize, usize, usize, usize);

impl SequenceArgs {
    /// The sequences of queries `shape_q` over keys `shape_k` (all keys without a description).
    pub(crate) fn sequences(
        this: Option<Self>,
        shape_q: [usize; 4],
        shape_k: [usize; 4],
    ) -> Result<Vec<core::Sequence>, core::Error> {
        let padded = |lens: Option<&[usize]>| core::padded_sequences(shape_q[0], shape_q[2], shape_k[2], lens);
        let Some(this) = this else { return padded(None) };
        match (this.cu_seqlens_q, this.cu_seqlens_k, this.explicit) {
            (Some(cq), Some(ck), _) => core::varlen_sequences(&cq, &ck, shape_q[2], shape_k[2]),
            (None, None, Some(spans)) => Ok(spans
                .into_iter()
                .map(|SpanArgs(batch, q_start, q_len, k_start, k_len)| core::Sequence {
                    batch,
                    q_start,
                    q_len,
                    k_start,
                    k_len,
                })
                .collect()),
            (None, None, None) => padded(this.kv_lengths.as_deref()),
            _ => Err(core::Error::Value("cu_seqlens_q and cu_seqlens_k go together".into())),
        }
    }
}

/// `ferroattn._cache_storage.KVEncoding`: keys and values stored in another type than the
/// queries; int8 ones with per-row float32 scales `(B, H, N, 1)`.
#[derive(FromPyObject)]
pub(crate) struct KvEncodingArgs<'py> {
    pub(crate) kv_dtype: PyBackedStr,
    pub(crate) k_scales: Option<Bound<'py, PyUntypedArray>>,
    pub(crate) v_scales: Option<Bound<'py, PyUntypedArray>>,
}

/// `ferroattn.paged.PageTable`: keys and values in a block cache, read through a block table
/// (`k`/`v` are then the cache viewed as `(num_blocks, Hkv, block_size, D)`).
#[derive(FromPyObject)]
pub(crate) struct PageArgs<'py> {
    /// int32, C-contiguous, `rows × per_row` physical block ids.
    pub(crate) block_table: PyReadonlyArray1<'py, i32>,
    /// Entries per table row (`max_blocks_per_seq`).
    pub(crate) per_row: usize,
}
