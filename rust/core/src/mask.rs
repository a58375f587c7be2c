//! What a query may see.
//!
//! Every mask ferroattn supports (causal in either alignment, a sliding window, per-sequence key
//! lengths) leaves each query a single contiguous range of keys, so a row's mask is two numbers
//! and a tile is skipped or clipped without ever building a mask array.

use crate::error::{ensure_shape, Error, Result};
use crate::memory::with_capacity;
use crate::precision::Precision;

/// Where query `i` of a sequence sits among its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Align {
    /// Query `i` has position `i + k_len − q_len`: the last query sees the last key
    /// (flash-attn ≥ 2.1, KV-cache decoding).
    #[default]
    BottomRight,
    /// Query `i` has position `i` (torch's `is_causal`).
    TopLeft,
}

/// Options shared by every kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Multiplies `q·k`; usually `1/sqrt(D)`.
    pub scale: f32,
    /// `Some(c)`: scores become `c·tanh(s/c)`.
    pub softcap: Option<f32>,
    pub causal: bool,
    pub align: Align,
    /// Keys visible to the left / right of a query's position; `None` = unbounded.
    pub window: (Option<usize>, Option<usize>),
    /// The first `sink_keys` keys of every sequence stay visible whatever the window
    /// (StreamingLLM's attention sinks), still subject to causality.
    pub sink_keys: usize,
    /// How f32 inputs' products may be computed (bf16 inputs always use bf16 products where
    /// the CPU has them).
    pub precision: Precision,
}

impl Params {
    pub fn new(scale: f32) -> Self {
        Params {
            scale,
            softcap: None,
            causal: false,
            align: Align::BottomRight,
            window: (None, None),
            sink_keys: 0,
            precision: Precision::Highest,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !self.scale.is_finite() {
            return Err(Error::Value(format!("scale must be finite, got {}", self.scale)));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::Value(format!("softcap must be a positive finite number, got {c}")));
            }
        }
        Ok(())
    }
}

/// One sequence of a batch: its query rows and key rows in the token axis of batch `batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub batch: usize,
    pub q_start: usize,
    pub q_len: usize,
    pub k_start: usize,
    pub k_len: usize,
}

/// Sequences of a padded batch: all queries, the first `kv_lengths[b]` keys (all when `None`).
pub fn padded_sequences(batch: usize, nq: usize, nk: usize, kv_lengths: Option<&[usize]>) -> Result<Vec<Sequence>> {
    if let Some(lens) = kv_lengths {
        ensure_shape!(lens.len() == batch, "kv_lengths has {} entries for a batch of {batch}", lens.len());
        if let Some(&bad) = lens.iter().find(|&&l| l > nk) {
            return Err(Error::Value(format!("kv_lengths must lie in [0, {nk}] (the key length), got {bad}")));
        }
    }
    let mut seqs = with_capacity(batch).map_err(|e| e.named("q (a sequence per batch entry)"))?;
    seqs.extend((0..batch).map(|b| Sequence {
        batch: b,
        q_start: 0,
        q_len: nq,
        k_start: 0,
        k_len: kv_lengths.map_or(nk, |l| l[b]),
    }));
    Ok(seqs)
}

/// Sequences of a packed batch from cumulative lengths (`cu[0] = 0`, non-decreasing).
pub fn varlen_sequences(cu_q: &[usize], cu_k: &[usize], total_q: usize, total_k: usize) -> Result<Vec<Sequence>> {
    for (name, cu, total) in [("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)] {
        ensure_shape!(!cu.is_empty() && cu[0] == 0, "{name} must start with 0");
        ensure_shape!(cu.windows(2).all(|w| w[0] <= w[1]), "{name} must be non-decreasing, got {cu:?}");
        ensure_shape!(
            cu[cu.len() - 1] == total,
            "{name} must end with the number of packed tokens ({total}), got {}",
            cu[cu.len() - 1]
        );
    }
    ensure_shape!(
        cu_q.len() == cu_k.len(),
        "cu_seqlens_q and cu_seqlens_k describe different numbers of sequences ({} vs {})",
        cu_q.len() - 1,
        cu_k.len() - 1
    );
    let mut seqs = with_capacity(cu_q.len() - 1).map_err(|e| e.named("cu_seqlens_q (its sequences)"))?;
    seqs.extend((0..cu_q.len() - 1).map(|s| Sequence {
        batch: 0,
        q_start: cu_q[s],
        q_len: cu_q[s + 1] - cu_q[s],
        k_start: cu_k[s],
        k_len: cu_k[s + 1] - cu_k[s],
    }));
    Ok(seqs)
}

/// The keys one query sees, relative to the sequence's first key: `[0, sink) ∪ [lo, hi)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Vis {
    pub sink: usize,
    pub lo: usize,
    pub hi: usize,
}

impl Vis {
    pub(crate) fn sees(&self, j: usize) -> bool {
        j < self.sink || (self.lo <= j && j < self.hi)
    }
    /// Whether every key of `k0..k1` is visible.
    pub(crate) fn sees_all(&self, k0: usize, k1: usize) -> bool {
        if self.sink >= self.lo {
            k1 <= self.hi.max(self.sink)
        } else {
            k1 <= self.sink || (self.lo <= k0 && k1 <= self.hi)
        }
    }
    /// The visible keys as at most two disjoint ranges, in order (empty ones included).
    pub(crate) fn ranges(&self) -> [(usize, usize); 2] {
        if self.sink >= self.lo {
            [(0, self.hi.max(self.sink)), (0, 0)]
        } else {
            [(0, self.sink), (self.lo, self.hi)]
        }
    }
}

/// `x` as an `i64`, `i64::MAX` when larger: lengths and window sides that large mean "beyond
/// any sequence" (a window side of `usize::MAX` is unbounded).
#[inline]
fn wide(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// The position of query `i` of `seq` among its keys (may be negative or past the last key).
#[inline]
pub(crate) fn position(p: &Params, seq: &Sequence, i: usize) -> i64 {
    match p.align {
        // `i − q_len` first: it lies in `[−q_len, 0)`, so adding `k_len` cannot overflow.
        Align::BottomRight => wide(i).saturating_sub(wide(seq.q_len)).saturating_add(wide(seq.k_len)),
        Align::TopLeft => wide(i),
    }
}

/// What query `i` of `seq` sees under `p`. Window sides saturate: one longer than any
/// sequence hides nothing.
#[inline]
pub(crate) fn visible(p: &Params, seq: &Sequence, i: usize) -> Vis {
    let k_len = wide(seq.k_len);
    let pos = position(p, seq, i);
    let mut lo = 0i64;
    let mut hi = k_len;
    if p.causal {
        hi = hi.min(pos.saturating_add(1));
    }
    // Sink keys obey causality and the key length, not the window.
    let sink = wide(p.sink_keys).min(hi).max(0) as usize;
    if let Some(left) = p.window.0 {
        lo = lo.max(pos.saturating_sub(wide(left)));
    }
    if let Some(right) = p.window.1 {
        hi = hi.min(pos.saturating_add(wide(right)).saturating_add(1));
    }
    let lo = lo.clamp(0, k_len) as usize;
    let hi = (hi.clamp(0, k_len) as usize).max(lo);
    Vis { sink, lo, hi }
}
