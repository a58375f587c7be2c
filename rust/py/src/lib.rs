//! The Python extension `ferroattn._ferroattn`: converts arguments, releases the GIL, calls
//! `ferroattn-core`, converts results. All argument normalization (ranks, layouts, dtypes,
//! defaults) happens in the Python package; this layer re-checks only what memory safety needs,
//! and refuses sizes it cannot allocate (`memory`) instead of letting an allocation abort.

mod arrays;
mod errors;
mod linear;
mod memory;

use arrays::Raw;
use ferroattn_core as core;
use numpy::{PyArray1, PyReadonlyArray2, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// Mask and score options shared by the entry points.
struct Options {
    params: core::Params,
}

#[allow(clippy::too_many_arguments)]
fn options(
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: Option<usize>,
    window_right: Option<usize>,
    sink_keys: usize,
    precision: &str,
) -> Options {
    let mut params = core::Params::new(scale as f32);
    params.softcap = softcap.map(|c| c as f32);
    params.causal = causal;
    params.align = if top_left { core::Align::TopLeft } else { core::Align::BottomRight };
    params.window = (window_left, window_right);
    params.sink_keys = sink_keys;
    // The Python layer validated the name; anything else keeps f32 products.
    params.precision = core::Precision::from_name(precision).unwrap_or_default();
    Options { params }
}

/// Biases, masks, layouts and sinks, owned for the duration of a call.
#[derive(Default)]
struct ExtrasArgs {
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    /// Table `(num_buckets, heads)` flat, num_buckets, max_distance, bidirectional.
    rel_bias: Option<(Vec<f32>, usize, usize, bool)>,
    bias: Option<Raw>,
    mask: Option<Raw>,
    /// Layout `(heads, q_blocks, k_blocks)` flat, heads, block size, q_blocks, k_blocks.
    blocks: Option<(Vec<u8>, usize, usize, usize, usize)>,
}

impl ExtrasArgs {
    /// # Safety
    /// The bias and mask arrays must outlive `'a` (they are borrowed by the call).
    unsafe fn extras<'a>(&'a self) -> Result<core::Extras<'a>, core::Error> {
        Ok(core::Extras {
            alibi_slopes: self.alibi_slopes.as_deref(),
            sinks: self.sinks.as_deref(),
            rel_bias: self.rel_bias.as_ref().map(|(table, num_buckets, max_distance, bidirectional)| core::RelBias {
                table,
                num_buckets: *num_buckets,
                max_distance: *max_distance,
                bidirectional: *bidirectional,
            }),
            // SAFETY: forwarded from the caller.
            bias: self.bias.as_ref().map(|r| unsafe { r.dense::<f32>() }).transpose()?,
            // SAFETY: forwarded from the caller.
            mask: self.mask.as_ref().map(|r| unsafe { r.dense::<u8>() }).transpose()?,
            blocks: self.blocks.as_ref().map(|(layout, heads, block, q_blocks, k_blocks)| core::BlockLayout {
                layout,
                heads: *heads,
                block: *block,
                q_blocks: *q_blocks,
                k_blocks: *k_blocks,
            }),
        })
    }
}

/// Reads the extras from keyword arguments: `bias` (float32) and `mask` (uint8) as 4-D
/// broadcast views, the rest as small lists.
#[allow(clippy::type_complexity)]
fn extras_args(
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel_bias: Option<(Vec<f32>, usize, usize, bool)>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    mask: Option<&Bound<'_, PyUntypedArray>>,
    blocks: Option<(Vec<u8>, usize, usize, usize, usize)>,
) -> Result<ExtrasArgs, core::Error> {
    Ok(ExtrasArgs {
        alibi_slopes,
        sinks,
        rel_bias,
        bias: bias.map(|a| Raw::new("bias", a, "float32")).transpose()?,
        mask: mask.map(|a| Raw::new("mask", a, "uint8")).transpose()?,
        blocks,
    })
}

/// An explicit sequence: (batch, q_start, q_len, k_start, k_len).
type SeqTuple = (usize, usize, usize, usize, usize);

fn sequences(
    shape_q: [usize; 4],
    shape_k: [usize; 4],
    kv_lengths: Option<Vec<usize>>,
    cu_seqlens: Option<(Vec<usize>, Vec<usize>)>,
    seqs: Option<Vec<SeqTuple>>,
) -> Result<Vec<core::Sequence>, core::Error> {
    match (cu_seqlens, seqs) {
        (Some((cq, ck)), _) => core::varlen_sequences(&cq, &ck, shape_q[2], shape_k[2]),
        (None, Some(list)) => Ok(list
            .into_iter()
            .map(|(batch, q_start, q_len, k_start, k_len)| core::Sequence { batch, q_start, q_len, k_start, k_len })
            .collect()),
        (None, None) => core::padded_sequences(shape_q[0], shape_q[2], shape_k[2], kv_lengths.as_deref()),
    }
}

/// Attention over 4-D `(B, H, N, D)` arrays into `out`; returns the flat LSE when asked.
///
/// `q`/`out` are of `dtype`, `k`/`v` of `kv_dtype` (default: `dtype`); int8 `k`/`v` need
/// `k_scales`/`v_scales` as float32 `(B, H, N, 1)` arrays. `seqs` lists explicit sequences
/// (batch, q_start, q_len, k_start, k_len) in place of `kv_lengths`/`cu_seqlens`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, dtype, *, scale, kv_dtype=None, k_scales=None, v_scales=None, softcap=None,
                    causal=false, top_left=false, window_left=None, window_right=None, sink_keys=0,
                    kv_lengths=None, cu_seqlens=None, seqs=None, return_lse=false, alibi_slopes=None,
                    sinks=None, rel_bias=None, bias=None, mask=None, blocks=None, precision="highest"))]
#[allow(clippy::too_many_arguments)]
fn attention<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyUntypedArray>,
    k: &Bound<'py, PyUntypedArray>,
    v: &Bound<'py, PyUntypedArray>,
    out: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    scale: f64,
    kv_dtype: Option<&str>,
    k_scales: Option<&Bound<'py, PyUntypedArray>>,
    v_scales: Option<&Bound<'py, PyUntypedArray>>,
    softcap: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: Option<usize>,
    window_right: Option<usize>,
    sink_keys: usize,
    kv_lengths: Option<Vec<usize>>,
    cu_seqlens: Option<(Vec<usize>, Vec<usize>)>,
    seqs: Option<Vec<SeqTuple>>,
    return_lse: bool,
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel_bias: Option<(Vec<f32>, usize, usize, bool)>,
    bias: Option<&Bound<'py, PyUntypedArray>>,
    mask: Option<&Bound<'py, PyUntypedArray>>,
    blocks: Option<(Vec<u8>, usize, usize, usize, usize)>,
    precision: &str,
) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
    let kv_dtype = kv_dtype.unwrap_or(dtype);
    let convert = || -> Result<_, core::Error> {
        let rq = Raw::new("q", q, dtype)?;
        let rk = Raw::new("k", k, kv_dtype)?;
        let rv = Raw::new("v", v, kv_dtype)?;
        let ro = Raw::new("out", out, dtype)?;
        let rks = k_scales.map(|a| Raw::new("k_scales", a, "float32")).transpose()?;
        let rvs = v_scales.map(|a| Raw::new("v_scales", a, "float32")).transpose()?;
        let extras = extras_args(alibi_slopes, sinks, rel_bias, bias, mask, blocks)?;
        let inputs =
            [Some(&rq), Some(&rk), Some(&rv), rks.as_ref(), rvs.as_ref(), extras.bias.as_ref(), extras.mask.as_ref()];
        for input in inputs.into_iter().flatten() {
            ro.check_disjoint(input)?;
        }
        Ok((rq, rk, rv, ro, rks, rvs, extras))
    };
    let (rq, rk, rv, ro, rks, rvs, extras) = convert().map_err(errors::to_py)?;
    let opts = options(scale, softcap, causal, top_left, window_left, window_right, sink_keys, precision);
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
            let seqs = sequences(qv.shape(), kv.shape(), kv_lengths, cu_seqlens, seqs)?;
            if no_query_heads(&qv, &kv) {
                return Ok(());
            }
            // SAFETY: bias and mask are borrowed by this call.
            let extras = unsafe { extras.extras()? };
            core::attention_with(&qv, &kv, &vv, &mut ov, lse.as_deref_mut(), &seqs, &opts.params, &extras)
        })
    })?;
    Ok(lse.map(|l| PyArray1::from_vec(py, l)))
}

/// Zero query heads (and at least one key/value head): nothing to compute, and the core's
/// task plan divides by the query heads per key/value head.
fn no_query_heads(q: &core::Strided, k: &core::Strided) -> bool {
    q.shape()[1] == 0 && k.shape()[1] >= 1
}

/// The `(B, Hq, Nq, Nk)` softmax probabilities, flat, as float32.
#[pyfunction]
#[pyo3(signature = (q, k, dtype, *, scale, softcap=None, causal=false, top_left=false,
                    window_left=None, window_right=None, kv_lengths=None, alibi_slopes=None, sinks=None,
                    rel_bias=None, bias=None, mask=None, blocks=None))]
#[allow(clippy::too_many_arguments)]
fn attention_weights<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyUntypedArray>,
    k: &Bound<'py, PyUntypedArray>,
    dtype: &str,
    scale: f64,
    softcap: Option<f64>,
    causal: bool,
    top_left: bool,
    window_left: Option<usize>,
    window_right: Option<usize>,
    kv_lengths: Option<Vec<usize>>,
    alibi_slopes: Option<Vec<f32>>,
    sinks: Option<Vec<f32>>,
    rel_bias: Option<(Vec<f32>, usize, usize, bool)>,
    bias: Option<&Bound<'py, PyUntypedArray>>,
    mask: Option<&Bound<'py, PyUntypedArray>>,
    blocks: Option<(Vec<u8>, usize, usize, usize, usize)>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let convert = || -> Result<_, core::Error> {
        let rq = Raw::new("q", q, dtype)?;
        let rk = Raw::new("k", k, dtype)?;
        Ok((rq, rk, extras_args(alibi_slopes, sinks, rel_bias, bias, mask, blocks)?))
    };
    let (rq, rk, extras) = convert().map_err(errors::to_py)?;
    let opts = options(scale, softcap, causal, top_left, window_left, window_right, 0, "highest");
    let q_shape: [usize; 4] = q.shape().try_into().unwrap_or([0; 4]);
    let (hkv, sk) = (k.shape().get(1).copied().unwrap_or(0), k.shape().get(2).copied().unwrap_or(0));
    let weights = py.detach(|| {
        errors::catch(|| {
            let [b, hq, sq, d] = q_shape;
            let what = "q and k (their attention weights)";
            let mut w = memory::zeroed::<f32>(memory::count(&[b, hq, sq, sk], what)?, what)?;
            memory::check_attention(q_shape, hkv, d, core::num_threads(), "q and k (the kernels' working memory)")?;
            // SAFETY: the arrays are borrowed by this call and outlive it.
            let (qv, kv, extras) = unsafe { (rq.view()?, rk.view()?, extras.extras()?) };
            let seqs = sequences(qv.shape(), kv.shape(), kv_lengths, None, None)?;
            if !no_query_heads(&qv, &kv) {
                core::attention_weights_with(&qv, &kv, &mut w, &seqs, &opts.params, &extras)?;
            }
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
fn set_num_threads(n: usize) {
    core::set_num_threads(n);
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
