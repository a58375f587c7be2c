//! Optional terms beyond the query/key product: additive biases (a dense array, ALiBi slopes, a
//! T5 relative-position table), boolean masks (dense or block-sparse), and per-head sink
//! logits that join the softmax denominator.
//!
//! Each is applied to a score tile after the softcap; the caller checks [`Variants::tile_live`]
//! first so tiles that nothing may see are never computed (the cost of a block-sparse layout
//! follows its density). An option that is off costs one branch per tile.

use crate::error::{ensure_shape, Error, Result};
use crate::layout::check_extent;

/// A read-only array of shape `(B, H, Nq, Nk)` with arbitrary (also zero: broadcast) strides.
#[derive(Clone, Copy)]
pub struct Dense<'a, T> {
    data: &'a [T],
    offset: usize,
    shape: [usize; 4],
    strides: [isize; 4],
}

impl<'a, T: Copy> Dense<'a, T> {
    /// `offset` is the index of element `[0, 0, 0, 0]`; strides count elements and may be 0.
    pub fn new(name: &str, data: &'a [T], offset: usize, shape: [usize; 4], strides: [isize; 4]) -> Result<Self> {
        check_extent(name, data.len(), offset, shape, strides, size_of::<T>())?;
        Ok(Dense { data, offset, shape, strides })
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Row `(b, h, i)` from key `j0` for `n` keys: element `t` of it, for the view's step
    /// (which may be 0 or negative).
    #[inline(always)]
    fn row(&self, b: usize, h: usize, i: usize, j0: usize, n: usize) -> Row<'a, T> {
        let s = self.strides;
        let at = self.offset as isize + b as isize * s[0] + h as isize * s[1] + i as isize * s[2] + j0 as isize * s[3];
        Row { data: self.data, at, step: s[3], n }
    }
}

/// `n` elements of a [`Dense`] row.
struct Row<'a, T> {
    data: &'a [T],
    at: isize,
    step: isize,
    n: usize,
}

impl<T: Copy> Row<'_, T> {
    #[inline(always)]
    fn get(&self, t: usize) -> T {
        self.data[(self.at + t as isize * self.step) as usize]
    }

    /// Folds `f` over the row with `init`, without early exit so a contiguous row vectorizes
    /// (an `all` with early exit runs one element at a time, which showed as 14–24% overhead
    /// of an all-true mask / all-zero bias).
    #[inline(always)]
    fn fold<A: Copy>(&self, init: A, f: impl Fn(A, T) -> A) -> A {
        match self.step {
            0 => f(init, self.get(0)),
            1 => self.data[self.at as usize..self.at as usize + self.n].iter().fold(init, |a, &x| f(a, x)),
            _ => (0..self.n).fold(init, |a, t| f(a, self.get(t))),
        }
    }
}

impl Row<'_, f32> {
    /// Whether every element is ±0.
    fn all_zero(&self) -> bool {
        self.fold(0u32, |a, x| a | (x.to_bits() & 0x7fff_ffff)) == 0
    }
}

/// A learned T5-style relative-position bias: `table[bucket(j − pos), h]`.
#[derive(Clone, Copy)]
pub struct RelBias<'a> {
    /// `(num_buckets, heads)` row-major.
    pub table: &'a [f32],
    pub num_buckets: usize,
    pub max_distance: usize,
    pub bidirectional: bool,
}

impl RelBias<'_> {
    /// The bucket of a relative position (key minus query), as in T5.
    pub fn bucket(&self, rel: i64) -> usize {
        let mut nb = self.num_buckets as i64;
        let mut bucket = 0;
        let dist = if self.bidirectional {
            nb /= 2;
            if rel > 0 {
                bucket += nb;
            }
            rel.abs()
        } else {
            (-rel).max(0)
        };
        let max_exact = nb / 2;
        if dist < max_exact {
            return (bucket + dist) as usize;
        }
        let ratio = (dist as f64 / max_exact as f64).ln() / (self.max_distance as f64 / max_exact as f64).ln();
        let large = max_exact + (ratio * (nb - max_exact) as f64) as i64;
        (bucket + large.min(nb - 1)) as usize
    }
}

/// A block-sparse layout: block `(qb, kb)` of head `h` is visible when
/// `layout[h % heads][qb][kb] != 0`.
#[derive(Clone, Copy)]
pub struct BlockLayout<'a> {
    /// `(heads, Nq / block, Nk / block)` row-major.
    pub layout: &'a [u8],
    pub heads: usize,
    pub block: usize,
    pub q_blocks: usize,
    pub k_blocks: usize,
}

impl BlockLayout<'_> {
    #[inline(always)]
    fn sees(&self, h: usize, i: usize, j: usize) -> bool {
        let (qb, kb) = (i / self.block, j / self.block);
        qb < self.q_blocks
            && kb < self.k_blocks
            && self.layout[((h % self.heads) * self.q_blocks + qb) * self.k_blocks + kb] != 0
    }
}

/// Everything optional about a call; `Variants::default()` is plain attention.
#[derive(Clone, Copy, Default)]
pub struct Variants<'a> {
    /// Per query head: adds `−slope · |pos − j|` (flash-attn's ALiBi).
    pub alibi_slopes: Option<&'a [f32]>,
    /// Per query head, natural units: a logit with no value that joins the denominator.
    pub sinks: Option<&'a [f32]>,
    pub rel_bias: Option<RelBias<'a>>,
    /// Added to the scores (natural units), indexed `(batch, query head, query, key)` in the
    /// tensors' coordinates.
    pub bias: Option<Dense<'a, f32>>,
    /// Nonzero where a query may see a key.
    pub mask: Option<Dense<'a, u8>>,
    pub blocks: Option<BlockLayout<'a>>,
}

/// What a scan of the dense mask and bias found for one row in one key tile (bits).
pub(crate) mod fact {
    /// The row may see some key of the tile (always set without a mask).
    pub const LIVE: u8 = 1;
    /// The mask shows the row every key of the tile.
    pub const ALL: u8 = 2;
    /// The bias adds nothing to the row in this tile.
    pub const ZERO: u8 = 4;
}

/// [`fact`] bits of every row in every key tile of one key range, made by [`Variants::scan`].
#[derive(Default)]
pub(crate) struct TileFacts {
    bits: Vec<u8>,
    k0: usize,
    bc: usize,
    rows: usize,
}

impl TileFacts {
    /// The facts of the tile at `k0`, one per row; empty when there is no dense mask or bias.
    #[inline(always)]
    pub(crate) fn tile(&self, k0: usize) -> &[u8] {
        if self.bits.is_empty() {
            return &[];
        }
        let t = (k0 - self.k0) / self.bc;
        &self.bits[t * self.rows..(t + 1) * self.rows]
    }
}

/// One row of a score tile: query head, query index and position, batch, tensor offsets.
#[derive(Clone, Copy)]
pub(crate) struct RowAt {
    pub batch: usize,
    pub head: usize,
    /// Query index in the q tensor.
    pub qi: usize,
    /// Aligned position of the query among its keys.
    pub pos: i64,
    /// Index of the sequence's first key in the k tensor.
    pub k_start: usize,
}

impl<'a> Variants<'a> {
    /// Whether anything can hide individual keys (so a tile may hold masked entries).
    pub(crate) fn masks(&self) -> bool {
        self.mask.is_some() || self.blocks.is_some()
    }

    fn adds(&self) -> bool {
        self.alibi_slopes.is_some() || self.rel_bias.is_some() || self.bias.is_some()
    }

    pub(crate) fn is_plain(&self) -> bool {
        !self.masks() && !self.adds()
    }

    pub(crate) fn validate(&self, b: usize, hq: usize, sq: usize, sk: usize) -> Result<()> {
        for (name, v) in [("alibi_slopes", self.alibi_slopes), ("sinks", self.sinks)] {
            if let Some(v) = v {
                ensure_shape!(v.len() == hq, "{name} has {} entries, expected one per query head ({hq})", v.len());
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::Value(format!("{name} must be finite")));
                }
            }
        }
        if let Some(r) = self.rel_bias {
            ensure_shape!(
                r.num_buckets >= 2 && r.table.len() == r.num_buckets * hq,
                "rel_bias table has {} entries, expected (num_buckets={}) × (heads={hq})",
                r.table.len(),
                r.num_buckets
            );
            let per_side = if r.bidirectional { r.num_buckets / 2 } else { r.num_buckets };
            ensure_shape!(
                per_side / 2 >= 1 && r.max_distance > per_side / 2,
                "rel_bias needs at least 2 buckets per direction and max_distance above half of them, got \
                 {} buckets and max_distance {}",
                r.num_buckets,
                r.max_distance
            );
        }
        if let Some(d) = &self.bias {
            ensure_shape!(d.shape == [b, hq, sq, sk], "bias has shape {:?}, expected {:?}", d.shape, [b, hq, sq, sk]);
        }
        if let Some(d) = &self.mask {
            ensure_shape!(d.shape == [b, hq, sq, sk], "mask has shape {:?}, expected {:?}", d.shape, [b, hq, sq, sk]);
        }
        if let Some(l) = self.blocks {
            ensure_shape!(l.block >= 1, "block_size must be at least 1");
            ensure_shape!(
                l.heads >= 1 && (l.heads == 1 || l.heads == hq),
                "block_layout has {} heads, expected 1 or {hq}",
                l.heads
            );
            ensure_shape!(
                sq.div_ceil(l.block) == l.q_blocks && sk.div_ceil(l.block) == l.k_blocks,
                "block_layout has {}×{} blocks, expected {}×{} for {sq} queries and {sk} keys in blocks of {}",
                l.q_blocks,
                l.k_blocks,
                sq.div_ceil(l.block),
                sk.div_ceil(l.block),
                l.block
            );
            ensure_shape!(
                l.layout.len() == l.heads * l.q_blocks * l.k_blocks,
                "block_layout buffer has the wrong size"
            );
        }
        Ok(())
    }

    /// Classifies every row of every key tile of `kmin..kmax` (tiles of `bc` keys from `kmin`)
    /// into `out` ([`fact`] bits); leaves `out` empty without a dense mask or bias.
    ///
    /// Reading each row once from end to end is a stream the hardware prefetchers follow; the
    /// same checks done tile by tile jump a whole key-length between 128-key pieces of rows and
    /// stalled on memory (an all-true mask cost 8–13% over no mask that way).
    pub(crate) fn scan(&self, rows: &[RowAt], kmin: usize, kmax: usize, bc: usize, out: &mut TileFacts) {
        let n = rows.len();
        (out.k0, out.bc, out.rows) = (kmin, bc, n);
        out.bits.clear();
        if self.mask.is_none() && self.bias.is_none() {
            return;
        }
        let tiles = (kmax - kmin).div_ceil(bc);
        out.bits.resize(tiles * n, fact::LIVE | fact::ALL | fact::ZERO);
        for (r, at) in rows.iter().enumerate() {
            for t in 0..tiles {
                let k0 = kmin + t * bc;
                let (j0, kn) = (at.k_start + k0, bc.min(kmax - k0));
                let f = &mut out.bits[t * n + r];
                if let Some(mask) = &self.mask {
                    let row = mask.row(at.batch, at.head, at.qi, j0, kn);
                    let (lo, hi) = row.fold((u8::MAX, 0u8), |(lo, hi), x| (lo.min(x), hi.max(x)));
                    if hi == 0 {
                        *f &= !fact::LIVE;
                    }
                    if lo == 0 {
                        *f &= !fact::ALL;
                    }
                }
                if let Some(bias) = &self.bias {
                    if !bias.row(at.batch, at.head, at.qi, j0, kn).all_zero() {
                        *f &= !fact::ZERO;
                    }
                }
            }
        }
    }

    /// Whether any row may see any key of `k0..k0 + kn` (keys relative to the sequence); false
    /// lets the caller skip the tile. `facts`: the tile's rows from [`Variants::scan`].
    pub(crate) fn tile_live(&self, rows: &[RowAt], k0: usize, kn: usize, facts: &[u8]) -> bool {
        if let Some(l) = self.blocks {
            let live = rows.iter().any(|r| {
                let (j0, j1) = (r.k_start + k0, r.k_start + k0 + kn);
                (j0 / l.block..j1.div_ceil(l.block)).any(|kb| l.sees(r.head, r.qi, kb * l.block))
            });
            if !live {
                return false;
            }
        }
        if self.mask.is_some() {
            return facts.iter().any(|&f| f & fact::LIVE != 0);
        }
        true
    }

    /// Applies biases (times `unit`, the score scale: log2 e) and masks to the score tile
    /// `st` (key `j` of row `r` at `st[j * ld + r]`).
    /// Returns whether anything was masked. `facts`: the tile's rows from [`Variants::scan`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply(
        &self,
        rows: &[RowAt],
        k0: usize,
        kn: usize,
        st: &mut [f32],
        ld: usize,
        unit: f32,
        facts: &[u8],
    ) -> bool {
        let mut masked = false;
        if self.is_plain() {
            return masked;
        }
        // Only a mask and a bias, and the scan found they change nothing in this tile.
        let inert = fact::ALL | fact::ZERO;
        let only_dense = self.alibi_slopes.is_none() && self.rel_bias.is_none() && self.blocks.is_none();
        if only_dense && facts.iter().fold(inert, |a, &x| a & x) == inert {
            return masked;
        }
        for (r, at) in rows.iter().enumerate() {
            let j0 = at.k_start + k0;
            if let Some(slopes) = self.alibi_slopes {
                let s = -slopes[at.head] * unit;
                for j in 0..kn {
                    st[j * ld + r] += s * (at.pos - (k0 + j) as i64).abs() as f32;
                }
            }
            if let Some(rb) = self.rel_bias {
                let hq = rb.table.len() / rb.num_buckets;
                for j in 0..kn {
                    let bucket = rb.bucket((k0 + j) as i64 - at.pos);
                    st[j * ld + r] += rb.table[bucket * hq + at.head] * unit;
                }
            }
            if let Some(bias) = &self.bias {
                let row = bias.row(at.batch, at.head, at.qi, j0, kn);
                // An all-zero row adds nothing: checking is a (vectorized, for contiguous rows)
                // read, adding is a strided write into the transposed tile.
                if facts[r] & fact::ZERO == 0 {
                    for j in 0..kn {
                        st[j * ld + r] += row.get(j) * unit;
                    }
                }
            }
            if let Some(mask) = &self.mask {
                let row = mask.row(at.batch, at.head, at.qi, j0, kn);
                if facts[r] & fact::ALL == 0 {
                    masked = true;
                    for j in 0..kn {
                        if row.get(j) == 0 {
                            st[j * ld + r] = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            if let Some(l) = self.blocks {
                for j in 0..kn {
                    if !l.sees(at.head, at.qi, j0 + j) {
                        masked = true;
                        st[j * ld + r] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        masked
    }

    /// The sink logit of query head `h`, natural units.
    pub(crate) fn sink(&self, h: usize) -> Option<f32> {
        self.sinks.map(|s| s[h])
    }
}
