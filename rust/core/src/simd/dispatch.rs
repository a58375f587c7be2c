//! The kernel table: which vector type each ISA runs a kernel with, and the
//! `#[target_feature]` entry point that instantiates it.
//!
//! Kernels are written once, generic over [`Simd`], as a [`Kernel`] whose `run::<S>` and
//! everything below it are `#[inline(always)]`. [`dispatch`] is the one place that turns an
//! [`Isa`] into a vector type: each arm calls an entry point compiled with that ISA's features,
//! into which the whole kernel inlines, so its intrinsics become plain instructions. (A kernel
//! body that is not inlined into an entry point runs its intrinsics as calls, 2–5× slower.)
//!
//! This is the seam for new hardware. A NEON path for aarch64 is a `simd/neon.rs` implementing
//! [`Simd`], an `Isa::Neon` found by [`Isa::available`], and one arm below; an AMX (`tdpbf16ps`)
//! tile product beside the FMA micro-kernels is likewise a new entry here, running the kernels
//! with a vector type whose tile products go to the AMX unit. Callers only ever call
//! [`dispatch`] with the active [`Isa`], so neither touches them. Extensions that only a few
//! kernels use on top of an ISA (VNNI's integer dot products for int8 caches) are checked
//! where they are used, inside the AVX-512 path.

use super::scalar::Scalar;
use super::{Isa, Simd};

/// A kernel body and its arguments, run on the vector type [`dispatch`] picks.
pub(crate) trait Kernel {
    type Output;

    /// Runs the kernel with vector type `S`; implementations are `#[inline(always)]`, so the
    /// body is compiled inside the entry point of `S`'s ISA.
    ///
    /// # Safety
    /// `S`'s instructions must be available on this CPU, besides the kernel's own conditions.
    unsafe fn run<S: Simd>(self) -> Self::Output;
}

/// Runs `kernel` on the vector type of `isa`.
///
/// # Safety
/// `isa` must be available on this CPU ([`Isa::available`]), and the kernel's own conditions
/// must hold.
pub(crate) unsafe fn dispatch<K: Kernel>(isa: Isa, kernel: K) -> K::Output {
    // SAFETY: forwarded from the caller; each entry point needs only its ISA.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512(kernel),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2(kernel),
            _ => kernel.run::<Scalar>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2<K: Kernel>(kernel: K) -> K::Output {
    // SAFETY: the caller checked the ISA.
    unsafe { kernel.run::<super::x86::Avx2>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn avx512<K: Kernel>(kernel: K) -> K::Output {
    // SAFETY: the caller checked the ISA.
    unsafe { kernel.run::<super::x86::Avx512>() }
}
