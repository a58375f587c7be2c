//! One error type for every bad input: the kernels return `Err`, they never panic on user data.

use std::fmt;

/// Why a call was refused. The binding maps `Shape`/`Value` to `ValueError`, `DType` to
/// `TypeError` and `Memory` to `MemoryError`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// Shapes, strides or lengths that do not fit together.
    Shape(String),
    /// An option with a value outside its domain.
    Value(String),
    /// An element type that does not fit.
    DType(String),
    /// Memory a call's sizes ask for that cannot be allocated (the message names the sizes).
    Memory(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(m) | Error::Value(m) | Error::DType(m) | Error::Memory(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Early-return a `Shape` error built with `format!` when the condition fails.
macro_rules! ensure_shape {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::Shape(format!($($fmt)+)));
        }
    };
}
pub(crate) use ensure_shape;
