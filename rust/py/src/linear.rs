//! The binding of linear attention: converts arrays (and the optional recurrent state) and
//! runs `ferroattn_core::linear_attention` without the GIL.

use crate::arrays::Raw;
use crate::errors;
use crate::memory;
use ferroattn_core as core;
use numpy::{PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// Linear attention over 4-D `(B, H, N, D)` arrays of `dtype` into `out`.
///
/// `state = (s, z)`: C-contiguous float32 `(B, Hkv, D, Dv)` and `(B, Hkv, 1, D)` arrays the
/// causal sums start from and are left in (updated in place).
#[pyfunction]
#[pyo3(signature = (q, k, v, out, dtype, *, causal=false, feature_map="elu1", eps=1e-6, state=None))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyUntypedArray>,
    k: &Bound<'py, PyUntypedArray>,
    v: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    causal: bool,
    feature_map: &str,
    eps: f64,
    state: Option<(Bound<'py, PyUntypedArray>, Bound<'py, PyUntypedArray>)>,
) -> PyResult<()> {
    let Some(fm) = core::FeatureMap::from_name(feature_map) else {
        return Err(errors::to_py(core::Error::Value(format!(
            "feature_map must be 'elu1' or 'relu', got {feature_map:?}"
        ))));
    };
    let mut params = core::LinearParams::new(causal, fm);
    params.eps = eps as f32;
    let convert = || -> Result<_, core::Error> {
        let rq = Raw::new("q", q, dtype)?;
        let rk = Raw::new("k", k, dtype)?;
        let rv = Raw::new("v", v, dtype)?;
        let ro = Raw::new("out", out, dtype)?;
        for input in [&rq, &rk, &rv] {
            ro.check_disjoint(input)?;
        }
        let rstate = match &state {
            Some((s, z)) => {
                let (rs, rz) = (Raw::new("state S", s, "float32")?, Raw::new("state z", z, "float32")?);
                for other in [&rq, &rk, &rv, &ro, &rz] {
                    rs.check_disjoint(other)?;
                }
                for other in [&rq, &rk, &rv, &ro] {
                    rz.check_disjoint(other)?;
                }
                Some((rs, rz))
            }
            None => None,
        };
        Ok((rq, rk, rv, ro, rstate))
    };
    let (rq, rk, rv, ro, _rstate) = convert().map_err(errors::to_py)?;
    let (d, dv) = (q.shape().get(3).copied().unwrap_or(0), v.shape().get(3).copied().unwrap_or(0));
    memory::check_linear(d, dv, core::num_threads(), "q, k and v (the kernels' working memory)")
        .map_err(errors::to_py)?;
    // The state is written in place: borrow it through NumPy's borrow checker, C order only
    // (rust-numpy's slices also accept Fortran order, which would scramble the layout).
    let mut guards = match &state {
        Some((s, z)) => {
            let mut g = Vec::with_capacity(2);
            for (name, a) in [("state S", s), ("state z", z)] {
                if !a.is_c_contiguous() {
                    return Err(errors::to_py(core::Error::Value(format!("{name} must be C-contiguous"))));
                }
                let typed = a
                    .cast::<PyArrayDyn<f32>>()
                    .map_err(|_| errors::to_py(core::Error::DType(format!("{name} must be a float32 array"))))?;
                let rw = typed
                    .try_readwrite()
                    .map_err(|e| errors::to_py(core::Error::Value(format!("{name} cannot be written: {e}"))))?;
                g.push(rw);
            }
            g
        }
        None => Vec::new(),
    };
    let slices = match guards.as_mut_slice() {
        [s, z] => {
            let s = s.as_slice_mut().map_err(|e| errors::to_py(core::Error::Value(format!("state S: {e}"))))?;
            let z = z.as_slice_mut().map_err(|e| errors::to_py(core::Error::Value(format!("state z: {e}"))))?;
            Some((s, z))
        }
        _ => None,
    };
    py.detach(|| {
        errors::catch(|| {
            // SAFETY: the arrays are borrowed by this call and outlive it; `out` was checked
            // writable and disjoint from the inputs, the state disjoint from all of them.
            let (qv, kv, vv, mut ov) = unsafe { (rq.view()?, rk.view()?, rv.view()?, ro.view_mut()?) };
            let st = slices.map(|(s, z)| core::LinearState { s, z });
            core::linear_attention(&qv, &kv, &vv, &mut ov, st, &params)
        })
    })
}
