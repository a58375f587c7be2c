//! Strided 4-D views `(batch, heads, tokens, dim)` over caller memory, in any of the three
//! element types.
//!
//! Both the head-major (BHSD) and token-major (BSHD) layouts, slices and negative strides are
//! just different strides here, so no input is copied to change its layout; only the last
//! (feature) axis must be contiguous, which the kernels rely on to convert a row at once.

use crate::error::{ensure_shape, Error, Result};
use crate::paged::Pages;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Element type of a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Quantized keys/values: `i8` times a per-row f32 scale (see [`Strided::with_scales`]).
    I8,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I8 => 1,
        }
    }
}

/// Read-only elements of one of the supported types.
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    I8(&'a [i8]),
}

impl Elems<'_> {
    fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::BF16(s) => s.len(),
            Elems::I8(s) => s.len(),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Elems::F32(_) => DType::F32,
            Elems::F16(_) => DType::F16,
            Elems::BF16(_) => DType::BF16,
            Elems::I8(_) => DType::I8,
        }
    }
}

/// Writable elements of one of the supported types.
pub enum ElemsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl ElemsMut<'_> {
    fn len(&self) -> usize {
        match self {
            ElemsMut::F32(s) => s.len(),
            ElemsMut::F16(s) => s.len(),
            ElemsMut::BF16(s) => s.len(),
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            ElemsMut::F32(_) => DType::F32,
            ElemsMut::F16(_) => DType::F16,
            ElemsMut::BF16(_) => DType::BF16,
        }
    }
}

/// Where a 4-D view reaches: the element offsets of its lowest and highest element relative
/// to element `[0, 0, 0, 0]` (`lo <= 0 <= hi`).
///
/// The one place that bounds a view (core views, dense terms, the binding's arrays). Computed
/// in `i128`, where no product of a `usize` extent and an `isize` stride overflows, so a
/// stride that would wrap in `isize` is refused instead of turning into a short, wrong span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lo: isize,
    pub hi: isize,
}

impl Extent {
    /// The extent of `shape` under `strides` (in elements, any sign) for elements of
    /// `item_size` bytes: `None` for an empty shape (it reaches nothing), an error naming
    /// `name` when the span from the lowest to the highest element, in bytes, exceeds what a
    /// buffer can hold (`isize::MAX`).
    pub fn of(name: &str, shape: [usize; 4], strides: [isize; 4], item_size: usize) -> Result<Option<Extent>> {
        if shape.contains(&0) {
            return Ok(None);
        }
        let (mut lo, mut hi) = (0i128, 0i128);
        for (&n, &s) in shape.iter().zip(&strides) {
            let span = (n as i128 - 1) * s as i128;
            if span < 0 {
                lo += span;
            } else {
                hi += span;
            }
        }
        let bytes = (hi - lo + 1) * item_size.max(1) as i128;
        ensure_shape!(
            bytes <= isize::MAX as i128,
            "{name}: shape {shape:?} with strides {strides:?} spans more memory than a buffer can hold"
        );
        // Both fit: |lo| and hi are at most the byte span, which fits in isize.
        Ok(Some(Extent { lo: lo as isize, hi: hi as isize }))
    }

    /// The number of elements from the lowest to the highest one, both included.
    pub fn elements(&self) -> usize {
        (self.hi as i128 - self.lo as i128 + 1) as usize
    }

    /// Whether every element lies in `0..len` when element `[0, 0, 0, 0]` is at `offset`.
    pub fn fits(&self, len: usize, offset: usize) -> bool {
        offset as i128 + self.lo as i128 >= 0 && (offset as i128 + self.hi as i128) < len as i128
    }
}

/// Checks that every index of `shape` under `strides`, offset by `offset`, lies in `0..len`
/// (an empty shape has none).
pub(crate) fn check_extent(
    name: &str,
    len: usize,
    offset: usize,
    shape: [usize; 4],
    strides: [isize; 4],
    item_size: usize,
) -> Result<()> {
    let fits = Extent::of(name, shape, strides, item_size)?.is_none_or(|e| e.fits(len, offset));
    ensure_shape!(
        fits,
        "{name}: shape {shape:?} with strides {strides:?} reaches outside its buffer of {len} elements"
    );
    Ok(())
}

/// The checks every view makes: a contiguous last axis, and every index inside the buffer.
fn check_view(name: &str, len: usize, offset: usize, shape: [usize; 4], strides: [isize; 4], dt: DType) -> Result<()> {
    ensure_shape!(
        shape.contains(&0) || shape[3] <= 1 || strides[3] == 1,
        "{name}: the last axis must be contiguous (stride 1), got strides {strides:?}"
    );
    check_extent(name, len, offset, shape, strides, dt.size())
}

/// Checks that `q (B, Hq, Nq, D)`, `k (B, Hkv, Nk, D)` and `v (B, Hkv, Nk, Dv)` fit together:
/// the same batch, head dimension and key length, at least one element per head, and whole
/// groups of query heads per KV head (GQA: query head `h` reads KV head `h / (Hq / Hkv)`);
/// zero query heads fit any number of KV heads, none included (there is nothing to compute).
pub(crate) fn check_qkv(q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<()> {
    let [b, hq, _, d] = q;
    let [bk, hkv, _, dk] = k;
    ensure_shape!(d >= 1, "q: head dimension must be at least 1, got shape {q:?}");
    ensure_shape!(bk == b, "q and k have different batch sizes: {q:?} vs {k:?}");
    ensure_shape!(dk == d, "q and k have different head dimensions: {q:?} vs {k:?}");
    ensure_shape!(
        (hkv >= 1 && hq % hkv == 0) || hq == 0,
        "query heads ({hq}) must be a multiple of key/value heads ({hkv}); q {q:?}, k {k:?}"
    );
    ensure_shape!(v[..3] == k[..3], "k and v must agree in batch, heads and length: k {k:?}, v {v:?}");
    ensure_shape!(v[3] >= 1, "v: value dimension must be at least 1, got shape {v:?}");
    Ok(())
}

/// A read-only strided view of shape `(B, H, N, D)`.
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    data: Elems<'a>,
    offset: usize,
    shape: [usize; 4],
    strides: [isize; 4],
    /// Per-row scales of int8 data: buffer, index of row `[0, 0, 0]`, strides of (B, H, N).
    scales: Option<(&'a [f32], usize, [isize; 3])>,
    /// The block table of a paged view; the batch stride (of data and scales) is then the
    /// stride between physical blocks, and the token stride the one inside a block.
    pages: Option<Pages<'a>>,
}

impl<'a> Strided<'a> {
    /// `offset` is the index of element `[0, 0, 0, 0]` in `data`; strides count elements.
    pub fn new(name: &str, data: Elems<'a>, offset: usize, shape: [usize; 4], strides: [isize; 4]) -> Result<Self> {
        check_view(name, data.len(), offset, shape, strides, data.dtype())?;
        Ok(Strided { data, offset, shape, strides, scales: None, pages: None })
    }

    /// Attaches the per-row scales of int8 data: row `[b, h, n, :]` is worth
    /// `data[b, h, n, :] · scales[b, h, n]`. On a paged view, `strides` are those of the
    /// physical cache's scales `(blocks, H, block_size)`, as for the data.
    pub fn with_scales(mut self, name: &str, scales: &'a [f32], offset: usize, strides: [isize; 3]) -> Result<Self> {
        ensure_shape!(self.dtype() == DType::I8, "{name}: scales only go with int8 data");
        let [b, h, n, _] = self.physical_shape();
        check_extent(name, scales.len(), offset, [b, h, n, 1], [strides[0], strides[1], strides[2], 1], 4)?;
        self.scales = Some((scales, offset, strides));
        Ok(self)
    }

    /// Turns a view of a block cache `(blocks, H, block_size, D)` into the paged view
    /// `(batch, H, per_batch · block_size, D)` that `table` describes: rows of `per_row`
    /// physical block ids, split evenly among the `batch` entries (one row each for a padded
    /// batch; every row in the one entry of packed queries, each sequence's keys then starting
    /// at its row's first token). See [`crate::paged`](Pages) for how rows are found; entries
    /// are checked against the cache when a call reads them.
    pub fn paged(mut self, name: &str, table: &'a [i32], per_row: usize, batch: usize) -> Result<Self> {
        ensure_shape!(self.pages.is_none(), "{name}: the view is paged already");
        let [blocks, h, block, d] = self.shape;
        let (pages, tokens) = Pages::new(name, table, per_row, batch, block, blocks)?;
        self.shape = [batch, h, tokens, d];
        self.pages = Some(pages);
        Ok(self)
    }

    /// Whether rows are found through a block table.
    pub fn is_paged(&self) -> bool {
        self.pages.is_some()
    }

    /// The shape of the memory behind the view: the cache's `(blocks, H, block_size, D)` for
    /// a paged view, the view's own shape otherwise.
    fn physical_shape(&self) -> [usize; 4] {
        match self.pages {
            Some(p) => [p.blocks, self.shape[1], p.block, self.shape[3]],
            None => self.shape,
        }
    }

    /// Whether the view can be read (int8 data needs its scales).
    pub(crate) fn check_readable(&self, name: &str) -> Result<()> {
        ensure_shape!(self.dtype() != DType::I8 || self.scales.is_some(), "{name}: int8 data needs per-row scales");
        Ok(())
    }

    /// A C-contiguous view over a whole buffer.
    pub fn contiguous(name: &str, data: Elems<'a>, shape: [usize; 4]) -> Result<Self> {
        let strides = contiguous_strides(shape);
        ensure_shape!(
            data.len() == shape.iter().product::<usize>(),
            "{name}: buffer of {} elements does not hold shape {shape:?}",
            data.len()
        );
        Self::new(name, data, 0, shape, strides)
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// The element index of row `[b, h, n, 0]` (on a paged view, of a row whose table entry
    /// was checked).
    #[inline]
    fn index(&self, b: usize, h: usize, n: usize) -> usize {
        let st = self.strides;
        Self::at(self.offset, [st[0], st[1], st[2]], self.pages, b, h, n)
    }

    /// The index of row `(b, h, n)` of a buffer whose row `[0, 0, 0]` is at `offset`, under the
    /// (B, H, N) strides `st`, through `pages` where given (then `st[0]` steps between blocks).
    #[inline(always)]
    fn at(offset: usize, st: [isize; 3], pages: Option<Pages>, b: usize, h: usize, n: usize) -> usize {
        let (outer, n) = match pages {
            Some(p) => p.locate(b, n),
            None => (b, n),
        };
        (offset as isize + outer as isize * st[0] + h as isize * st[1] + n as isize * st[2]) as usize
    }

    /// The index of the int8 scale of row `(b, h, n)`.
    #[inline]
    fn scale_index(&self, off: usize, st: [isize; 3], b: usize, h: usize, n: usize) -> usize {
        Self::at(off, st, self.pages, b, h, n)
    }

    /// How many rows from row `n` on lie `strides[2]` apart, as the pointers of
    /// [`Strided::f32_rows`] and [`Strided::typed_rows`] are walked: up to the end of `n`'s
    /// block on a paged view, all of them otherwise.
    #[inline]
    pub(crate) fn run_len(&self, n: usize) -> usize {
        self.pages.map_or(usize::MAX, |p| p.run(n))
    }

    /// On a paged view, checks the table entries that rows `n0..n1` of batch entry `b` are
    /// read through (see [`Pages::check_keys`]); every view of a call checks the rows it will
    /// read before a kernel runs.
    pub(crate) fn check_rows(&self, b: usize, n0: usize, n1: usize) -> Result<()> {
        self.pages.map_or(Ok(()), |p| p.check_keys(b, n0, n1))
    }

    /// For f32 data: a pointer to row `[b, h, n, :]` and the distance between consecutive
    /// tokens, so f32 tiles are read in place instead of copied (for [`Strided::run_len`]
    /// rows).
    #[inline]
    pub(crate) fn f32_rows(&self, b: usize, h: usize, n: usize) -> Option<(*const f32, isize)> {
        match self.data {
            // `add` on the whole slice's pointer keeps provenance over every row, negative strides too.
            // SAFETY: `index` is in bounds for in-range (b, h, n) (checked at construction).
            Elems::F32(s) => Some((unsafe { s.as_ptr().add(self.index(b, h, n)) }, self.strides[2])),
            _ => None,
        }
    }

    /// Row `[b, h, n, :]` in its storage type with the distance between tokens (and, for int8,
    /// the row's scale and the distance between scales), for kernels that widen in registers
    /// (for [`Strided::run_len`] rows).
    #[inline]
    pub(crate) fn typed_rows(&self, b: usize, h: usize, n: usize) -> TypedRows {
        let at = self.index(b, h, n);
        let ld = self.strides[2];
        // `index` is in bounds for in-range (b, h, n) (checked at construction); offsetting the
        // whole buffer's pointer keeps provenance over every row.
        match self.data {
            Elems::F32(s) => TypedRows::F32(s.as_ptr().wrapping_add(at), ld),
            Elems::F16(s) => TypedRows::F16(s.as_ptr().wrapping_add(at), ld),
            Elems::BF16(s) => TypedRows::BF16(s.as_ptr().wrapping_add(at), ld),
            Elems::I8(s) => match self.scales {
                Some((sc, off, st)) => {
                    let si = self.scale_index(off, st, b, h, n);
                    TypedRows::I8(s.as_ptr().wrapping_add(at), ld, sc.as_ptr().wrapping_add(si), st[2])
                }
                None => TypedRows::Unreadable,
            },
        }
    }

    /// Converts row `[b, h, n, :]` to f32 into `dst` (length `D`), times `mul`.
    #[inline]
    pub(crate) fn read_row(&self, b: usize, h: usize, n: usize, dst: &mut [f32], mul: f32) {
        let d = self.shape[3];
        let at = self.index(b, h, n);
        match self.data {
            Elems::F32(s) => dst[..d].copy_from_slice(&s[at..at + d]),
            Elems::F16(s) => s[at..at + d].convert_to_f32_slice(&mut dst[..d]),
            Elems::BF16(s) => s[at..at + d].convert_to_f32_slice(&mut dst[..d]),
            Elems::I8(s) => {
                let scale = match self.scales {
                    Some((sc, off, st)) => sc[self.scale_index(off, st, b, h, n)],
                    None => f32::NAN,
                } * mul;
                for (o, &x) in dst[..d].iter_mut().zip(&s[at..at + d]) {
                    *o = x as f32 * scale;
                }
                return;
            }
        }
        if mul != 1.0 {
            dst[..d].iter_mut().for_each(|x| *x *= mul);
        }
    }
}

/// Rows of a view in their storage type: pointer to the first row and token stride.
#[derive(Clone, Copy)]
pub(crate) enum TypedRows {
    F32(*const f32, isize),
    F16(*const f16, isize),
    BF16(*const bf16, isize),
    /// Data, its token stride, the first row's scale, the scales' token stride.
    I8(*const i8, isize, *const f32, isize),
    Unreadable,
}

pub(crate) fn contiguous_strides(shape: [usize; 4]) -> [isize; 4] {
    let mut strides = [1isize; 4];
    for i in (0..3).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1) as isize;
    }
    strides
}

/// A writable strided view of shape `(B, H, N, D)`; distinct indices never share memory.
pub struct StridedMut<'a> {
    data: ElemsMut<'a>,
    offset: usize,
    shape: [usize; 4],
    strides: [isize; 4],
}

impl<'a> StridedMut<'a> {
    pub fn new(name: &str, data: ElemsMut<'a>, offset: usize, shape: [usize; 4], strides: [isize; 4]) -> Result<Self> {
        check_view(name, data.len(), offset, shape, strides, data.dtype())?;
        // Rows are written from several threads: no two indices may alias. Sorted by |stride|,
        // each stride must step over everything the smaller axes span. (Empty views write
        // nothing.)
        let mut axes: Vec<(usize, usize)> = (0..4)
            .filter(|&i| shape[i] > 1 && !shape.contains(&0))
            .map(|i| (strides[i].unsigned_abs(), shape[i]))
            .collect();
        axes.sort_unstable();
        let mut span = 1usize;
        for (stride, n) in axes {
            if stride < span {
                return Err(Error::Shape(format!(
                    "{name}: strides {strides:?} make different elements of shape {shape:?} overlap"
                )));
            }
            span += stride * (n - 1);
        }
        Ok(StridedMut { data, offset, shape, strides })
    }

    pub fn contiguous(name: &str, data: ElemsMut<'a>, shape: [usize; 4]) -> Result<Self> {
        ensure_shape!(
            data.len() == shape.iter().product::<usize>(),
            "{name}: buffer of {} elements does not hold shape {shape:?}",
            data.len()
        );
        Self::new(name, data, 0, shape, contiguous_strides(shape))
    }

    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// A handle that writes rows from several threads at once.
    pub(crate) fn rows(&mut self) -> RowWriter<'_> {
        let (ptr, dtype) = match &mut self.data {
            ElemsMut::F32(s) => (s.as_mut_ptr() as *mut u8, DType::F32),
            ElemsMut::F16(s) => (s.as_mut_ptr() as *mut u8, DType::F16),
            ElemsMut::BF16(s) => (s.as_mut_ptr() as *mut u8, DType::BF16),
        };
        RowWriter {
            ptr,
            dtype,
            offset: self.offset,
            shape: self.shape,
            strides: self.strides,
            _life: std::marker::PhantomData,
        }
    }
}

/// Shared writer of whole rows of a [`StridedMut`]; each row must be written by one thread.
pub(crate) struct RowWriter<'a> {
    ptr: *mut u8,
    dtype: DType,
    offset: usize,
    shape: [usize; 4],
    strides: [isize; 4],
    _life: std::marker::PhantomData<&'a mut [u8]>,
}

// SAFETY: `StridedMut::new` proved that distinct rows are disjoint memory, and the kernels write
// each row from exactly one task, so concurrent writes never touch the same bytes.
unsafe impl Sync for RowWriter<'_> {}
// SAFETY: as for Sync; the pointer is only dereferenced through `write_row`.
unsafe impl Send for RowWriter<'_> {}

impl RowWriter<'_> {
    /// Writes `src` (length `D`) into row `[b, h, n, :]`, rounding to the view's type.
    ///
    /// # Safety
    /// No other thread may write the same row concurrently.
    #[inline]
    pub(crate) unsafe fn write_row(&self, b: usize, h: usize, n: usize, src: &[f32]) {
        let d = self.shape[3];
        debug_assert!(b < self.shape[0] && h < self.shape[1] && n < self.shape[2] && src.len() >= d);
        let at = (self.offset as isize
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + n as isize * self.strides[2]) as usize;
        // SAFETY: `check_extent` proved `at..at + d` in bounds for every in-range index, rows are
        // disjoint (see the Sync impl), and the caller writes each row from one thread.
        unsafe {
            match self.dtype {
                DType::F32 => {
                    std::slice::from_raw_parts_mut((self.ptr as *mut f32).add(at), d).copy_from_slice(&src[..d])
                }
                DType::F16 => {
                    std::slice::from_raw_parts_mut((self.ptr as *mut f16).add(at), d).convert_from_f32_slice(&src[..d])
                }
                DType::BF16 => {
                    std::slice::from_raw_parts_mut((self.ptr as *mut bf16).add(at), d).convert_from_f32_slice(&src[..d])
                }
                // `ElemsMut` has no int8 variant, so no writer is ever int8.
                DType::I8 => unreachable!("outputs are never int8"),
            }
        }
    }
}
