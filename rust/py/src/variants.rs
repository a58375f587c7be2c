//! The score variants of a call (biases, masks, block-sparse layouts, sink logits) as
//! `ferroattn.variants.Variants` holds them, and their conversion to `ferroattn_core::Variants`.

use crate::arrays::Raw;
use ferroattn_core as core;
use numpy::PyUntypedArray;
use pyo3::prelude::*;

/// `ferroattn.variants.Variants`: each term None when not given.
#[derive(FromPyObject)]
pub(crate) struct VariantArgs<'py> {
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel_bias: Option<RelBiasArgs>,
    /// float32, broadcast to `(B, Hq, Nq, Nk)`.
    bias: Option<Bound<'py, PyUntypedArray>>,
    /// uint8 (nonzero: visible), broadcast to `(B, Hq, Nq, Nk)`.
    mask: Option<Bound<'py, PyUntypedArray>>,
    blocks: Option<BlockLayoutArgs>,
}

/// `ferroattn.variants.RelBias`: a T5 bias table `(num_buckets, heads)`, flat.
#[derive(FromPyObject)]
struct RelBiasArgs {
    table: Vec<f32>,
    num_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
}

/// `ferroattn.variants.BlockLayout`: a block-sparse layout `(heads, q_blocks, k_blocks)`, flat.
#[derive(FromPyObject)]
struct BlockLayoutArgs {
    layout: Vec<u8>,
    heads: usize,
    block: usize,
    q_blocks: usize,
    k_blocks: usize,
}

/// The variants, owned (the arrays as [`Raw`] views) so they can cross into the GIL-free part
/// of a call.
#[derive(Default)]
pub(crate) struct VariantBuffers {
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel_bias: Option<RelBiasArgs>,
    pub(crate) bias: Option<Raw>,
    pub(crate) mask: Option<Raw>,
    blocks: Option<BlockLayoutArgs>,
}

impl VariantBuffers {
    /// Checks the arrays' types and bounds; no variants (None) is plain attention.
    pub(crate) fn new(args: Option<VariantArgs<'_>>) -> Result<VariantBuffers, core::Error> {
        let Some(a) = args else { return Ok(VariantBuffers::default()) };
        Ok(VariantBuffers {
            bias: a.bias.map(|x| Raw::new("bias", &x, "float32")).transpose()?,
            mask: a.mask.map(|x| Raw::new("mask", &x, "uint8")).transpose()?,
            alibi_slopes: a.alibi_slopes,
            sinks: a.sinks,
            rel_bias: a.rel_bias,
            blocks: a.blocks,
        })
    }

    /// # Safety
    /// The bias and mask arrays must outlive `'a` (they are borrowed by the call).
    pub(crate) unsafe fn variants<'a>(&'a self) -> Result<core::Variants<'a>, core::Error> {
        Ok(core::Variants {
            alibi_slopes: self.alibi_slopes.as_deref(),
            sinks: self.sinks.as_deref(),
            rel_bias: self.rel_bias.as_ref().map(|r| core::RelBias {
                table: &r.table,
                num_buckets: r.num_buckets,
                max_distance: r.max_distance,
                bidirectional: r.bidirectional,
            }),
            // SAFETY: forwarded from the caller.
            bias: self.bias.as_ref().map(|r| unsafe { r.dense::<f32>() }).transpose()?,
            // SAFETY: forwarded from the caller.
            mask: self.mask.as_ref().map(|r| unsafe { r.dense::<u8>() }).transpose()?,
            blocks: self.blocks.as_ref().map(|l| core::BlockLayout {
                layout: &l.layout,
                heads: l.heads,
                block: l.block,
                q_blocks: l.q_blocks,
                k_blocks: l.k_blocks,
            }),
        })
    }
}
