//! Buffers whose size a caller controls: allocated fallibly, sized with checked products.
//!
//! `vec![0; n]` aborts the process when `n` elements cannot be had, and a size product that
//! overflows wraps (in release builds) into a small buffer the kernels would then overrun.
//! Strided views make any size cheap to ask for (a zero stride repeats one element), so every
//! buffer sized by a call's shapes goes through this module: an allocation that cannot be made
//! is a [`NoMemory`], which the entry points turn into [`Error::Memory`] naming their
//! arguments.

use crate::error::Error;

/// An allocation that could not be made, and how many bytes it asked for (`None`: more than
/// a 64-bit size holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NoMemory {
    pub bytes: Option<usize>,
}

/// The result of a step that allocates.
pub(crate) type Alloc<T> = std::result::Result<T, NoMemory>;

impl NoMemory {
    /// The refusal of a call: `what` names the arguments whose sizes asked for the memory.
    pub(crate) fn named(self, what: &str) -> Error {
        let size =
            self.bytes.map_or_else(|| "more bytes than a 64-bit size holds".to_string(), |b| format!("{b} bytes"));
        Error::Memory(format!("{what}: cannot allocate the memory asked for ({size})"))
    }
}

/// `a · b`, or [`NoMemory`] when the product overflows.
#[inline]
pub(crate) fn mul(a: usize, b: usize) -> Alloc<usize> {
    a.checked_mul(b).ok_or(NoMemory { bytes: None })
}

/// An empty vector with room for `n` elements.
pub(crate) fn with_capacity<T>(n: usize) -> Alloc<Vec<T>> {
    let mut v = Vec::new();
    match v.try_reserve_exact(n) {
        Ok(()) => Ok(v),
        Err(_) => Err(NoMemory { bytes: n.checked_mul(size_of::<T>()) }),
    }
}

/// `n` copies of `value`.
pub(crate) fn filled<T: Clone>(n: usize, value: T) -> Alloc<Vec<T>> {
    let mut v = with_capacity(n)?;
    v.resize(n, value);
    Ok(v)
}

/// `n` default values (zeros).
pub(crate) fn zeroed<T: Clone + Default>(n: usize) -> Alloc<Vec<T>> {
    filled(n, T::default())
}

/// The product of `dims` (each a name and a size), or `Error::Memory` naming `what` and the
/// dimensions when it overflows a 64-bit size.
pub(crate) fn product(what: &str, dims: &[(&str, usize)]) -> Result<usize, Error> {
    dims.iter().try_fold(1usize, |acc, &(_, n)| acc.checked_mul(n)).ok_or_else(|| {
        let names: Vec<&str> = dims.iter().map(|&(name, _)| name).collect();
        let sizes: Vec<String> = dims.iter().map(|&(_, n)| n.to_string()).collect();
        Error::Memory(format!("{what}: {} = {} is more than a 64-bit size holds", names.join("·"), sizes.join(" × ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_beyond_the_machine_are_refusals_not_aborts() {
        assert_eq!(zeroed::<f32>(3).unwrap(), vec![0.0; 3]);
        // More f32s than a 64-bit count of bytes holds, and fewer that no machine has.
        assert_eq!(zeroed::<f32>(usize::MAX / 2), Err(NoMemory { bytes: None }));
        assert_eq!(zeroed::<f32>(1 << 60), Err(NoMemory { bytes: Some(1 << 62) }));
        assert_eq!(with_capacity::<u8>(1 << 62), Err(NoMemory { bytes: Some(1 << 62) }));
        assert_eq!(mul(1 << 40, 1 << 30), Err(NoMemory { bytes: None }));
        let e = NoMemory { bytes: Some(12) }.named("q and k");
        assert_eq!(e, Error::Memory("q and k: cannot allocate the memory asked for (12 bytes)".into()));
        assert_eq!(product("q", &[("B", 2), ("Hq", 3)]), Ok(6));
        let Err(Error::Memory(m)) = product("q and k", &[("B", 1 << 40), ("Nk", 1 << 30)]) else { panic!() };
        assert!(m.starts_with("q and k: B·Nk = "), "{m}");
    }
}
