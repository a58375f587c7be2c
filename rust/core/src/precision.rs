//! How float32 products may be computed, named and valued like PyTorch's
//! `torch.set_float32_matmul_precision`: `Highest` multiplies in f32; `High` and `Medium` let
//! a CPU with bf16 dot products (AVX-512 BF16) compute them from bf16 parts, three products
//! per pair of operands (each split into a bf16 high part and a bf16 remainder: hi·hi + hi·lo +
//! lo·hi, ~16 bits of each operand) or one (hi·hi, ~8 bits), accumulated in f32. A CPU without
//! them runs `Highest` whatever is asked.

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 products (the results of every earlier release, bit for bit).
    #[default]
    Highest,
    /// Three bf16 products per f32 product: about 1e-5 relative.
    High,
    /// One bf16 product per f32 product: about 1e-2 relative.
    Medium,
}

impl Precision {
    /// The name PyTorch uses for the same setting.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Highest => "highest",
            Precision::High => "high",
            Precision::Medium => "medium",
        }
    }

    /// The setting called `name` (as [`Precision::name`] writes it).
    pub fn from_name(name: &str) -> Option<Precision> {
        match name {
            "highest" => Some(Precision::Highest),
            "high" => Some(Precision::High),
            "medium" => Some(Precision::Medium),
            _ => None,
        }
    }

    /// bf16 products per f32 product, or `None` for f32 arithmetic.
    pub(crate) fn terms(self) -> Option<usize> {
        match self {
            Precision::Highest => None,
            Precision::High => Some(3),
            Precision::Medium => Some(1),
        }
    }
}
