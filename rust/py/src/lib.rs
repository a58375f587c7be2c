//! The Python extension `ferroattn._ferroattn`: converts arguments, releases the GIL, calls
//! `ferroattn-core`, converts results. All argument normalization (ranks, layouts, dtypes,
//! defaults) happens in the Python package; this layer re-checks only what memory safety needs,
//! and refuses sizes it cannot allocate (`memory`) instead of letting an allocation abort.

mod args;
mod arrays;
mod errors;
mod linear;
mod memory;
mod variants;

use args::{KvEncodingArgs, MaskArgs, PageArgs, SequenceArgs};
use arrays::Raw;
use ferroattn_core as core;
use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use variants::{VariantArgs, VariantBuffers};

/// Attention over 4-D `(B, H, N, D)` arrays into `out`; returns the flat LSE when asked.
///
/// `q`/`out` are of `dtype`; `k`/`v` too unless `kv_encoding` names their type (int8 with
/// its scales). `mask`, `sequences`, `variants`, `kv_encoding` and `pages` are the Python
/// package's typed option groups (see `args` and `variants`); with `pages`, `k`/`v` (and their
/// scales) are block caches read through its block table, its rows split evenly among `q`'s
/// batch entries.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, dtype, mask, *, sequences=None, variants=None, kv_encoding=None, pages=None, return_lse=false))]
#[allow(clippy::too_many_arguments)]
fn attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyUntypedArray>,
    k: &Bound<'py, PyUntypedArray>,
    v: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    mask: MaskArgs,
    sequences: Option<SequenceArgs>,
    variants: Option<VariantArgs<'py>>,
    kv_encoding: Option<KvEncodingArgs<'py>>,
    pages: Option<PageArgs<'py>>,
    return_lse: bool,
) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
    let kv_dtype = kv_encoding.as_ref().map_or(dtype, |e| &*e.kv_dtype);
    let convert = || -> Result<_, core::Error> {
        let rq = Raw::new("q", q, dtype)?;
        let rk = Raw::new("k", k, kv_dtype)?;
        let rv = Raw::new("v", v, kv_dtype)?;
        let ro = Raw::new("out", out, dtype)?;
        let scales = |name, a: Option<&Bound<'py, PyUntypedArray>>| a.map(|a| Raw::new(name, a, "float32")).transpose();
        let encoding = kv_encoding.as_ref();
        let rks = scales("k_scales", encoding.and_then(|e| e.k_scales.as_ref()))?;
        let rvs = scales("v_scales", encoding.and_then(|e| e.v_scales.as_ref()))?;
        let variants = VariantBuffers::new(variants)?;
        let optional = [&rks, &rvs, &variants.bias, &variants.mask];
        for input in [&rq, &rk, &rv].into_iter().chain(optional.into_iter().flatten()) {
            ro.check_disjoint(input)?;
        }
        let table = match &pages {
            Some(p) => Some((
                p.block_table.as_slice().map_err(|_| core::Error::Value("block_table must be C-contiguous".into()))?,
                p.per_row,
            )),
            None => None,
        };
        Ok((rq, rk, rv, ro, rks, rvs, variants, table))
    };
    let (rq, rk, rv, ro, rks, rvs, variants, table) = convert().map_err(errors::to_py)?;
    let params = mask.params();
    let q_shape: [usize; 4] = q.shape().try_into().unwrap_or([0; 4]);
    let (hkv, dv) = (k.shape().get(1).copied().unwrap_or(0), v.shape().get(3).copied().unwrap_or(0));
    let sizes = || -> Result<_, core::Error> {
        let [b, hq, sq, _] = q_shape;
        let lse = match return_lse {
            true => Some(memory::zeroed::<f32>(memory::count(&[b, hq, sq], "q")?, "q (its log-sum-exp)")?),
            false => None,
        };
        memory::check_attention(q_shape, hkv, dv, core::num_threads(), "q, k and v (the kernels' working memory)")?;
        Ok(lse)
    };
    let mut lse = sizes().map_err(errors::to_py)?;
    py.detach(|| {
        errors::catch(|| {
            // SAFETY: the arrays are borrowed by this call and outlive it; `out` was checked
            // writable and disjoint from the inputs.
            let (qv, mut kv, mut vv, mut ov) = unsafe { (rq.view()?, rk.view()?, rv.view()?, ro.view_mut()?) };
            for (view, raw, name) in [(&mut kv, &rks, "k_scales"), (&mut vv, &rvs, "v_scales")] {
                if let Some(r) = raw {
                    // SAFETY: as above.
                    let (data, offset, strides) = unsafe { r.scale_parts()? };
                    *view = view.with_scales(name, data, offset, strides)?;
                }
            }
            if let Some((table, per_row)) = table {
                let batch = qv.shape()[0];
                kv = kv.paged("k", table, per_row, batch)?;
                vv = vv.paged("v", table, per_row, batch)?;
            }
            let seqs = SequenceArgs::sequences(sequences, qv.shape(), kv.shape())?;
            // SAFETY: bias and mask are borrowed by this call.
            let variants = unsafe { variants.variants()? };
            core::attention_with(&qv, &kv, &vv, &mut ov, lse.as_deref_mut(), &seqs, &params, &variants)
        })
    })?;
    Ok(lse.map(|l| PyArray1::from_vec(py, l)))
}

/// The `(B, Hq, Nq, Nk)` softmax probabilities, flat, as float32; options as for [`attention`].
#[pyfunction]
#[pyo3(signature = (q, k, dtype, mask, *, sequences=None, variants=None))]
fn attention_weights<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyUntypedArray>,
    k: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    mask: MaskArgs,
    sequences: Option<SequenceArgs>,
    variants: Option<VariantArgs<'py>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let convert = || -> Result<_, core::Error> {
        let rq = Raw::new("q", q, dtype)?;
        let rk = Raw::new("k", k, dtype)?;
        Ok((rq, rk, VariantBuffers::new(variants)?))
    };
    let (rq, rk, variants) = convert().map_err(errors::to_py)?;
    let params = mask.params();
    let q_shape: [usize; 4] = q.shape().try_into().unwrap_or([0; 4]);
    let (hkv, sk) = (k.shape().get(1).copied().unwrap_or(0), k.shape().get(2).copied().unwrap_or(0));
    let weights = py.detach(|| {
        errors::catch(|| {
            let [b, hq, sq, d] = q_shape;
            let what = "q and k (their attention weights)";
            let mut w = memory::zeroed::<f32>(memory::count(&[b, hq, sq, sk], what)?, what)?;
            memory::check_attention(q_shape, hkv, d, core::num_threads(), "q and k (the kernels' working memory)")?;
            // SAFETY: the arrays are borrowed by this call and outlive it.
            let (qv, kv, variants) = unsafe { (rq.view()?, rk.view()?, variants.variants()?) };
            let seqs = SequenceArgs::sequences(sequences, qv.shape(), kv.shape())?;
            core::attention_weights_with(&qv, &kv, &mut w, &seqs, &params, &variants)?;
            Ok(w)
        })
    })?;
    Ok(PyArray1::from_vec(py, weights))
}

/// int8 values and their scales, as `quantize_int8` returns them.
type Quantized<'py> = (Bound<'py, PyArray1<i8>>, Bound<'py, PyArray1<f32>>);

/// Rounds the rows of a C-contiguous float32 `(rows, d)` array to int8, one scale per row
/// (`max |x| / 127`, half to even); returns the flat int8 values and the scales.
#[pyfunction]
fn quantize_int8<'py>(py: Python<'py>, x: PyReadonlyArray2<'py, f32>) -> PyResult<Quantized<'py>> {
    let [rows, d] = [x.shape()[0], x.shape()[1]];
    let data = x.as_slice().map_err(|_| pyo3::exceptions::PyValueError::new_err("x must be C-contiguous"))?;
    let sizes = || -> Result<_, core::Error> {
        Ok((memory::zeroed::<i8>(memory::count(&[rows, d], "x")?, "x")?, memory::zeroed::<f32>(rows, "x")?))
    };
    let (mut q, mut scales) = sizes().map_err(errors::to_py)?;
    // A prefill chunk can be megabytes: other Python threads may run meanwhile.
    py.detach(|| errors::catch(|| core::quantize_int8(data, d, &mut q, &mut scales)))?;
    Ok((PyArray1::from_vec(py, q), PyArray1::from_vec(py, scales)))
}

/// Sets the number of threads the kernels use.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    core::set_num_threads(n).map_err(errors::to_py)
}

/// The number of threads the kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    core::num_threads()
}

/// Build and CPU facts: SIMD path, available paths, CPU features, threads.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item("isa", core::Isa::active().name())?;
    d.set_item("isa_available", core::Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>())?;
    d.set_item("cpu_features", core::cpu_features())?;
    d.set_item("num_threads", core::num_threads())?;
    let (ahead, one_row) = core::stream_requests();
    d.set_item("stream_prefetch_bytes", ahead)?;
    d.set_item("one_row_stream_prefetch", one_row)?;
    d.set_item("arch", std::env::consts::ARCH)?;
    d.set_item("bf16_dot", core::bf16_dot())?;
    d.set_item("amx", false)?;
    Ok(d)
}

/// Drops the thread pool in a forked child, where its threads do not exist.
#[pyfunction]
fn _after_fork_in_child() {
    core::forget_pool_after_fork();
}

#[pymodule]
mod _ferroattn {
    #[pymodule_export]
    use super::linear::linear_attention;
    #[pymodule_export]
    use super::{
        _after_fork_in_child, attention, attention_weights, build_info, get_num_threads, quantize_int8, set_num_threads,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
