//! Zero-copy views of NumPy arrays as core strided views.
//!
//! The Python layer has already normalized every array to 4-D `(B, H, N, D)` with a contiguous
//! last axis and a native float dtype; here we only re-check what soundness depends on (rank,
//! item size, alignment, bounds, writability, no overlap with the output) and borrow the memory.

use ferroattn_core::{DType, Elems, ElemsMut, Error, Extent, Strided, StridedMut};
use half::{bf16, f16};
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// The raw facts of one array: where element 0 is, and the span of memory it reaches.
pub(crate) struct Raw {
    name: &'static str,
    dtype: DType,
    base: *mut u8,
    shape: [usize; 4],
    /// Strides in elements.
    strides: [isize; 4],
    /// The elements the array reaches around element 0; None when it is empty.
    extent: Option<Extent>,
    writeable: bool,
}

// SAFETY: the pointer refers to NumPy memory kept alive by the caller's borrowed array for the
// whole call; it is only turned into slices inside that call.
unsafe impl Send for Raw {}
// SAFETY: as for Send; `Raw` itself is never mutated after construction.
unsafe impl Sync for Raw {}

fn dtype_of(name: &str, code: &str) -> Result<(DType, usize), Error> {
    match code {
        "float32" => Ok((DType::F32, 4)),
        "float16" => Ok((DType::F16, 2)),
        "bfloat16" => Ok((DType::BF16, 2)),
        "int8" => Ok((DType::I8, 1)),
        // Masks: bytes, read as "nonzero means visible".
        "uint8" => Ok((DType::I8, 1)),
        other => Err(Error::DType(format!("{name}: unsupported dtype {other}"))),
    }
}

impl Raw {
    pub(crate) fn new(name: &'static str, arr: &Bound<'_, PyUntypedArray>, code: &str) -> Result<Raw, Error> {
        let (dtype, size) = dtype_of(name, code)?;
        if arr.ndim() != 4 {
            return Err(Error::Shape(format!("{name}: expected a 4-D array, got {} dimensions", arr.ndim())));
        }
        if arr.dtype().itemsize() != size {
            return Err(Error::DType(format!("{name}: item size {} does not match {code}", arr.dtype().itemsize())));
        }
        let mut shape = [0usize; 4];
        shape.copy_from_slice(arr.shape());
        let mut strides = [0isize; 4];
        for (s, &b) in strides.iter_mut().zip(arr.strides()) {
            if b % size as isize != 0 {
                return Err(Error::Shape(format!(
                    "{name}: byte strides {:?} are not multiples of {size}",
                    arr.strides()
                )));
            }
            *s = b / size as isize;
        }
        // SAFETY: `as_array_ptr` is a live PyArrayObject while `arr` is borrowed.
        let (base, flags) = unsafe {
            let p = arr.as_array_ptr();
            ((*p).fields.data as *mut u8, (*p).fields.flags)
        };
        if !(base as usize).is_multiple_of(size) {
            return Err(Error::Shape(format!("{name}: data is not aligned to its item size")));
        }
        let extent = Extent::of(name, shape, strides, size)?;
        Ok(Raw {
            name,
            dtype,
            base,
            shape,
            strides,
            extent,
            writeable: flags & numpy::npyffi::NPY_ARRAY_WRITEABLE != 0,
        })
    }

    fn item_size(&self) -> usize {
        self.dtype.size()
    }

    /// The first and one-past-the-last byte addresses the array reaches (`None`: empty).
    fn byte_range(&self) -> Option<(usize, usize)> {
        let e = self.extent?;
        let size = self.item_size() as isize;
        // In bounds of the allocation NumPy describes (`Extent::of` bounded its byte span).
        let start = self.base.wrapping_offset(e.lo * size) as usize;
        Some((start, start.saturating_add(e.elements() * self.item_size())))
    }

    /// Refuses an output that shares memory with an input: the core would alias `&` and `&mut`.
    pub(crate) fn check_disjoint(&self, other: &Raw) -> Result<(), Error> {
        let (Some((a0, a1)), Some((b0, b1))) = (self.byte_range(), other.byte_range()) else {
            return Ok(());
        };
        if a0 < b1 && b0 < a1 {
            return Err(Error::Value(format!("{} must not share memory with {}", self.name, other.name)));
        }
        Ok(())
    }

    /// The lowest element's address, the number of elements from it to the highest, and the
    /// index of element 0 among them (a null pointer and zeros when the array is empty).
    fn reach(&self) -> (*mut u8, usize, usize) {
        match self.extent {
            Some(e) => (self.base.wrapping_offset(e.lo * self.item_size() as isize), e.elements(), (-e.lo) as usize),
            None => (std::ptr::null_mut(), 0, 0),
        }
    }

    /// # Safety
    /// The array behind `self` must stay alive and unmodified by others for `'a`.
    pub(crate) unsafe fn view<'a>(&self) -> Result<Strided<'a>, Error> {
        let (start, n, offset) = self.reach();
        // SAFETY: `lo..=hi` is exactly the span NumPy says the array covers, aligned above.
        let data = unsafe {
            match self.dtype {
                DType::F32 => Elems::F32(slice_or_empty(start as *const f32, n)),
                DType::F16 => Elems::F16(slice_or_empty(start as *const f16, n)),
                DType::BF16 => Elems::BF16(slice_or_empty(start as *const bf16, n)),
                DType::I8 => Elems::I8(slice_or_empty(start as *const i8, n)),
            }
        };
        Strided::new(self.name, data, offset, self.shape, self.strides)
    }

    /// # Safety
    /// As for [`Raw::view`], and no other reference to the memory may exist for `'a`.
    pub(crate) unsafe fn view_mut<'a>(&self) -> Result<StridedMut<'a>, Error> {
        if !self.writeable {
            return Err(Error::Value(format!("{} is read-only", self.name)));
        }
        let (start, n, offset) = self.reach();
        // SAFETY: as in `view`; exclusivity is the caller's promise (checked with check_disjoint).
        let data = unsafe {
            match self.dtype {
                DType::F32 => ElemsMut::F32(slice_mut_or_empty(start as *mut f32, n)),
                DType::F16 => ElemsMut::F16(slice_mut_or_empty(start as *mut f16, n)),
                DType::BF16 => ElemsMut::BF16(slice_mut_or_empty(start as *mut bf16, n)),
                DType::I8 => return Err(Error::DType(format!("{}: outputs cannot be int8", self.name))),
            }
        };
        StridedMut::new(self.name, data, offset, self.shape, self.strides)
    }
}

impl Raw {
    /// A broadcastable `(B, H, Nq, Nk)` view (biases, masks); `T` must have the array's item size.
    ///
    /// # Safety
    /// As for [`Raw::view`].
    pub(crate) unsafe fn dense<'a, T: Copy>(&self) -> Result<ferroattn_core::Dense<'a, T>, Error> {
        if size_of::<T>() != self.item_size() {
            return Err(Error::DType(format!("{}: unexpected item size", self.name)));
        }
        let (start, n, offset) = self.reach();
        // SAFETY: as in `view`.
        let data = unsafe { slice_or_empty(start as *const T, n) };
        ferroattn_core::Dense::new(self.name, data, offset, self.shape, self.strides)
    }

    /// The per-row scales of int8 data, given as a float32 `(B, H, N, 1)` array: buffer, index of
    /// row `[0, 0, 0]`, strides.
    ///
    /// # Safety
    /// As for [`Raw::view`].
    pub(crate) unsafe fn scale_parts<'a>(&self) -> Result<(&'a [f32], usize, [isize; 3]), Error> {
        if self.dtype != DType::F32 {
            return Err(Error::DType(format!("{}: scales must be float32", self.name)));
        }
        let (start, n, offset) = self.reach();
        // SAFETY: as in `view`.
        let data = unsafe { slice_or_empty(start as *const f32, n) };
        Ok((data, offset, [self.strides[0], self.strides[1], self.strides[2]]))
    }
}

/// # Safety
/// `p` valid for `n` reads when `n > 0`.
unsafe fn slice_or_empty<'a, T>(p: *const T, n: usize) -> &'a [T] {
    if n == 0 {
        &[]
    } else {
        // SAFETY: forwarded.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

/// # Safety
/// `p` valid and exclusive for `n` writes when `n > 0`.
unsafe fn slice_mut_or_empty<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    if n == 0 {
        &mut []
    } else {
        // SAFETY: forwarded.
        unsafe { std::slice::from_raw_parts_mut(p, n) }
    }
}
