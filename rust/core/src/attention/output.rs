//! Where finished rows go: the output view and, when asked for, the log-sum-exp buffer.
//!
//! Tasks write disjoint rows from several threads at once, so both are raw shared handles
//! whose writes are `unsafe`: the task split, not the type, guarantees that no two threads
//! write the same row.

use crate::layout::RowWriter;
use crate::mask::Sequence;

/// Raw destination for the log-sum-exp, `(B, Hq, Sq)` contiguous.
#[derive(Clone, Copy)]
pub(crate) struct LsePtr(pub *mut f32);
// SAFETY: each task writes the LSE of its own rows only; rows of different tasks are disjoint.
unsafe impl Send for LsePtr {}
// SAFETY: as for Send.
unsafe impl Sync for LsePtr {}

/// The output rows of an attention call and their LSE.
pub(crate) struct Output<'a> {
    pub rows: RowWriter<'a>,
    pub lse: Option<LsePtr>,
    /// Strides of the LSE buffer for (batch, head, token).
    pub lse_dims: [usize; 3],
}

impl Output<'_> {
    /// Writes one output row and its LSE.
    ///
    /// # Safety
    /// No other thread may write the same row concurrently.
    pub(crate) unsafe fn write(&self, seq: &Sequence, h: usize, i: usize, row: &[f32], lse: f32) {
        // SAFETY: forwarded from the caller.
        unsafe { self.rows.write_row(seq.batch, h, i, row) };
        if let Some(ptr) = self.lse {
            let at = seq.batch * self.lse_dims[0] + h * self.lse_dims[1] + i * self.lse_dims[2];
            // SAFETY: `attention` checked the buffer holds B·Hq·Sq entries; the row is ours.
            unsafe { *ptr.0.add(at) = lse };
        }
    }
}
