//! The kernel table: which vector type each ISA runs a kernel with, and the
//! `#[target_feature]` entry point that instantiates it.
//!
//! Kernels are written once, as a body generic over [`Simd`](super::Simd) and
//! `#[inline(always)]` all the way down. [`kernel_entry!`] is the one place that turns an
//! [`Isa`](super::Isa) into a vector type: for a kernel body it defines a function taking the
//! ISA and the body's arguments, whose match calls an entry point compiled with that ISA's
//! features, into which the whole body inlines, so its intrinsics become plain instructions
//! (a body not inlined into an entry point runs them as calls, several times slower).
//!
//! The entry points take the body's arguments as they are, not packed into a struct: a
//! reference argument of a function is known not to change while it runs, which lets the
//! compiler keep what it points to in registers across the kernel's raw-pointer stores
//! (through a struct field, the attention-weights loop reloaded its destination on every
//! element and ran 16% slower).
//!
//! This is the seam for new hardware. The NEON path of aarch64 is `simd/neon.rs` implementing
//! `Simd`, `Isa::Neon` found by `Isa::available`, and one arm below; an AMX (`tdpbf16ps`)
//! tile product beside the FMA micro-kernels is likewise a new arm, running the bodies with a
//! vector type whose tile products go to the AMX unit. Kernels and their callers do not
//! change. Extensions that only a few kernels use on top of an ISA (VNNI's integer dot
//! products for int8 caches) are checked where they are used, inside the AVX-512 path.

/// Defines `unsafe fn NAME(isa: Isa, args...)`, which runs the generic kernel body
/// `BODY::<S>(args...)` with `S` the vector type of `isa`:
///
/// ```text
/// kernel_entry! {
///     /// Runs one task on the kernel of `isa`.
///     pub(crate) unsafe fn run(ctx: &Ctx, task: &Task) => body
/// }
/// ```
///
/// The defined function's safety contract: `isa` is available on this CPU
/// (`Isa::available`), and `BODY`'s own conditions hold.
macro_rules! kernel_entry {
    ($(#[$attr:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$attr])*
        $vis unsafe fn $name(isa: $crate::simd::Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller checked the ISA; the body's conditions are forwarded.
                unsafe { $body::<$crate::simd::x86::Avx2>($($arg),*) }
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma,f16c")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller checked the ISA; the body's conditions are forwarded.
                unsafe { $body::<$crate::simd::x86::Avx512>($($arg),*) }
            }

            #[cfg(target_arch = "aarch64")]
            #[target_feature(enable = "neon")]
            unsafe fn neon($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller checked the ISA; the body's conditions are forwarded.
                unsafe { $body::<$crate::simd::neon::Neon>($($arg),*) }
            }

            // SAFETY: forwarded from the caller; each entry point needs only its ISA.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    $crate::simd::Isa::Avx512 => avx512($($arg),*),
                    #[cfg(target_arch = "x86_64")]
                    $crate::simd::Isa::Avx2 => avx2($($arg),*),
                    #[cfg(target_arch = "aarch64")]
                    $crate::simd::Isa::Neon => neon($($arg),*),
                    _ => $body::<$crate::simd::scalar::Scalar>($($arg),*),
                }
            }
        }
    };
}

pub(crate) use kernel_entry;
