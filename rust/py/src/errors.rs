//! Core errors and panics as the Python exceptions users already catch.

use ferroattn_core::Error;
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

pub(crate) fn to_py(e: Error) -> PyErr {
    match e {
        Error::Shape(m) | Error::Value(m) => PyValueError::new_err(m),
        Error::DType(m) => PyTypeError::new_err(m),
        Error::Memory(m) => PyMemoryError::new_err(m),
    }
}

/// Runs `f`, turning a panic into `RuntimeError` so a bug never aborts the interpreter.
pub(crate) fn catch<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, PyErr> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(to_py),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!("ferroattn internal error (please report): {msg}")))
        }
    }
}
