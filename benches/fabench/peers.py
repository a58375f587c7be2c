"""The candidates other than ferroattn, and the float64 reference.

- NumPy: plain float32 matmul -> softmax -> matmul, blocked so that at most
  ``NUMPY_BLOCK_BYTES`` of scores exist at a time; masks as a precomputed additive -inf mask,
  so it does the full dense work whatever the mask.
- torch: ``scaled_dot_product_attention`` on the CPU over zero-copy ``from_numpy`` tensors,
  under ``inference_mode``; FlexAttention compiled for the sliding window.
- ONNX Runtime: one-node ``com.microsoft`` models built in memory with ``onnx.helper``
  (``MultiHeadAttention``, ``GroupQueryAttention``) on the CPUExecutionProvider, inputs packed
  ``(B, N, H*D)`` once, untimed.

A peer that cannot run returns a :class:`~fabench.timing.Cand` without ``fn`` whose status
says why: not installed, ``n/a`` (the peer cannot express the case), or ``skipped`` (its
memory would blow up).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from .env import Peers, short
from .tables import fmt_bytes
from .timing import Cand

TORCH = "torch sdpa"
ORT_MHA = "ort MHA"
ORT_GQA = "ort GQA"
NUMPY = "numpy"
FLEX = "torch flex (compiled)"
NUMPY_MAX_SCORES = 1 << 30  # NumPy skipped when all B*H*Nq*Nk float32 scores exceed this
NUMPY_BLOCK_BYTES = 256 << 20  # NumPy scores computed for this many bytes at a time
ORT_MAX_SCORES = 4 << 30  # ORT's CPU kernels hold B*H*Nq*Nk float32 probabilities


def scores_bytes(b: int, h: int, nq: int, nk: int) -> int:
    """Bytes of all B*H*Nq*Nk float32 scores."""
    return 4 * b * h * nq * nk


def band(nq: int, nk: int, causal: bool, window: int | None) -> np.ndarray:
    """Boolean (nq, nk) visibility, bottom-right aligned, window = last w keys incl. own."""
    i = np.arange(nq)[:, None] + (nk - nq)
    j = np.arange(nk)[None, :]
    keep = np.ones((nq, nk), dtype=bool)
    if causal or window is not None:
        keep &= j <= i
    if window is not None:
        keep &= j > i - window
    return keep


def visible_pairs(n: int, window: int | None, causal: bool) -> int:
    """Query-key pairs a query sees (self-attention, N queries over N keys)."""
    if window is not None:
        w = min(window, n)
        return w * (w + 1) // 2 + (n - w) * w
    return n * (n + 1) // 2 if causal else n * n


def kv_bytes(dtype: str, hkv: int, length: int, d: int) -> int:
    """Bytes of K and V storage for ``length`` tokens; int8 adds one float32 scale per token,
    head and tensor."""
    item = {"float32": 4, "float16": 2, "int8": 1}[dtype]
    total = 2 * hkv * length * d * item
    if dtype == "int8":
        total += 2 * hkv * length * 4
    return total


def reference64(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """float64 softmax(q k^T / sqrt(D)) v for one batch, GQA, no mask; q (1, H, Nq, D)."""
    _, h, nq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = np.empty((1, h, nq, v.shape[3]), dtype=np.float64)
    for j in range(hkv):
        qj = q[0, j * g : (j + 1) * g].astype(np.float64)  # (g, Nq, D)
        s = qj @ k[0, j].astype(np.float64).T / math.sqrt(d)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out[0, j * g : (j + 1) * g] = s @ v[0, j].astype(np.float64)
    return out


def make_numpy(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False, window: int | None = None
) -> Callable[[], np.ndarray]:
    """Plain float32 attention over (B, H, N, D) arrays, GQA by stacking the query heads of a
    KV head along the rows."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    scale = np.float32(1.0 / math.sqrt(d))
    qf = q.reshape(b * hkv, g * nq, d)
    kt = np.ascontiguousarray(k.reshape(b * hkv, nk, d).transpose(0, 2, 1))
    vf = v.reshape(b * hkv, nk, dv)
    step = max(1, NUMPY_BLOCK_BYTES // (g * nq * nk * 4))
    mask = None
    if causal or window is not None:
        mask = np.where(band(nq, nk, causal, window), np.float32(0.0), np.float32(-np.inf))
        mask = np.tile(mask, (g, 1))

    def run() -> np.ndarray:
        out = np.empty((b * hkv, g * nq, dv), dtype=np.float32)
        for lo in range(0, b * hkv, step):
            hi = min(b * hkv, lo + step)
            s = np.matmul(qf[lo:hi], kt[lo:hi])
            s *= scale
            if mask is not None:
                s += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            np.matmul(s, vf[lo:hi], out=out[lo:hi])
            out[lo:hi] /= denom
        return out.reshape(b, hq, nq, dv)

    return run


def numpy_cand(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool = False,
    window: int | None = None,
    *,
    name: str = NUMPY,
) -> Cand:
    """The NumPy peer, skipped when all its scores would exceed ``NUMPY_MAX_SCORES``."""
    b, h, nq, _ = q.shape
    size = scores_bytes(b, h, nq, k.shape[2])
    if size > NUMPY_MAX_SCORES:
        return Cand(name, status=f"skipped: scores {fmt_bytes(size)} > 1 GiB")
    return Cand(name, make_numpy(q, k, v, causal, window))


def torch_cand(
    peers: Peers,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    mask: np.ndarray | None = None,
    gqa: bool = False,
    dtype: str = "float32",
    name: str = TORCH,
) -> Cand:
    """torch SDPA (``is_causal``, a boolean ``attn_mask``, ``enable_gqa``); ``dtype`` float16
    or bfloat16 casts q, k and v once (one dtype for all three)."""
    torch = peers.get("torch")
    if torch is None:
        return Cand(name, status=peers.status("torch"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # zero copy
    if dtype in ("float16", "bfloat16"):
        cast = getattr(torch, dtype)
        tq, tk, tv = (x.to(cast).contiguous() for x in (tq, tk, tv))
    tm = torch.from_numpy(mask) if mask is not None else None
    kwargs: dict[str, Any] = {"is_causal": causal} if tm is None else {"attn_mask": tm}
    if gqa:
        kwargs["enable_gqa"] = True

    def run() -> Any:
        with torch.inference_mode():
            return sdpa(tq, tk, tv, **kwargs)

    return Cand(name, run)


def flex_cand(peers: Peers, q: np.ndarray, k: np.ndarray, v: np.ndarray, w: int) -> Cand:
    """torch FlexAttention, compiled, with a sliding-window block mask of width ``w`` (the
    compile happens at the first call: the accuracy check, untimed)."""
    torch = peers.get("torch")
    if torch is None:
        return Cand(FLEX, status=peers.status("torch"))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as exc:  # noqa: BLE001
        return Cand(FLEX, status=f"n/a: {short(exc, 100)}")
    n = q.shape[2]

    def sliding(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)

    try:
        block_mask = create_block_mask(sliding, None, None, n, n, device="cpu")
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        return Cand(FLEX, status=f"n/a: {short(exc, 120)}")
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))

    def run() -> Any:
        with torch.inference_mode():
            return flex(tq, tk, tv, block_mask=block_mask)

    return Cand(FLEX, run)


# --------------------------------------------------------------------------- ONNX Runtime


def _bshd(x: np.ndarray) -> np.ndarray:
    """(B, H, N, D) -> contiguous (B, N, H*D), ORT's packed layout."""
    b, h, n, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(b, n, h * d))


def _unpack(h: int, d: int) -> Callable[[np.ndarray], np.ndarray]:
    """ORT's packed (B, N, H*D) output -> (B, H, N, D)."""

    def convert(o: np.ndarray) -> np.ndarray:
        return o.reshape(o.shape[0], o.shape[1], h, d).transpose(0, 2, 1, 3)

    return convert


def _ort_session(
    ort: Any, onnx: Any, node: Any, inputs: list[Any], outputs: list[Any], t: int
) -> Any:
    """A CPU session of the one-node model, ``t`` intra-op threads."""
    helper = onnx.helper
    graph = helper.make_graph([node], node.op_type, inputs, outputs)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 10  # readable by every onnxruntime >= 1.20
    so = ort.SessionOptions()
    so.intra_op_num_threads = t
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_cand(
    name: str, build: Callable[[], Any], feeds: dict[str, np.ndarray], h: int, d: int
) -> Cand:
    """A candidate running the session ``build`` makes on ``feeds`` (packed output unpacked
    to (B, H, N, D)), or the reason it could not be made."""
    try:
        sess = build()
    except Exception as exc:  # noqa: BLE001
        return Cand(name, status=f"failed: {short(exc)}")

    def run() -> np.ndarray:
        return sess.run(["output"], feeds)[0]

    return Cand(name, run, convert=_unpack(h, d))


def _gqa_session(
    ort: Any,
    onnx: Any,
    threads: int,
    shape: tuple[int, int, int, int, int],
    *,
    past: bool,
    window: int | None,
) -> Any:
    """A GroupQueryAttention session for ``shape`` = (B, new tokens, H, Hkv, D), with a past
    cache or none, and a local window or none."""
    b, n, h, hkv, d = shape
    helper, tp = onnx.helper, onnx.TensorProto
    f32 = tp.FLOAT
    attrs: dict[str, Any] = {"num_heads": h, "kv_num_heads": hkv}
    if window is not None:
        attrs["local_window_size"] = window
    past_names = ["past_key", "past_value"] if past else ["", ""]
    node = helper.make_node(
        "GroupQueryAttention",
        ["query", "key", "value", *past_names, "seqlens_k", "total_sequence_length"],
        ["output", "present_key", "present_value"],
        domain="com.microsoft",
        **attrs,
    )
    inputs = [
        helper.make_tensor_value_info("query", f32, [b, n, h * d]),
        helper.make_tensor_value_info("key", f32, [b, n, hkv * d]),
        helper.make_tensor_value_info("value", f32, [b, n, hkv * d]),
    ]
    if past:
        inputs += [
            helper.make_tensor_value_info("past_key", f32, [b, hkv, "P", d]),
            helper.make_tensor_value_info("past_value", f32, [b, hkv, "P", d]),
        ]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", tp.INT32, [b]),
        helper.make_tensor_value_info("total_sequence_length", tp.INT32, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", f32, [b, n, h * d]),
        helper.make_tensor_value_info("present_key", f32, [b, hkv, "T", d]),
        helper.make_tensor_value_info("present_value", f32, [b, hkv, "T", d]),
    ]
    return _ort_session(ort, onnx, node, inputs, outputs, threads)


def ort_mha_cand(
    peers: Peers, threads: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool
) -> Cand:
    """com.microsoft MultiHeadAttention (``unidirectional=1`` for causal)."""
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_MHA, status=why)
    b, h, n, d = q.shape
    if k.shape[1] != h:
        return Cand(ORT_MHA, status="n/a (MHA has no grouped KV heads)")
    size = scores_bytes(b, h, n, k.shape[2])
    if size > ORT_MAX_SCORES:
        return Cand(ORT_MHA, status=f"skipped: ORT CPU holds {fmt_bytes(size)} of probabilities")
    helper, f32 = onnx.helper, onnx.TensorProto.FLOAT
    node = helper.make_node(
        "MultiHeadAttention",
        ["query", "key", "value"],
        ["output"],
        domain="com.microsoft",
        num_heads=h,
        unidirectional=int(causal),
    )
    shape = [b, n, h * d]
    inputs = [helper.make_tensor_value_info(x, f32, shape) for x in ("query", "key", "value")]
    outputs = [helper.make_tensor_value_info("output", f32, shape)]
    feeds = {"query": _bshd(q), "key": _bshd(k), "value": _bshd(v)}
    build = partial(_ort_session, ort, onnx, node, inputs, outputs, threads)
    return _ort_cand(ORT_MHA, build, feeds, h, d)


def ort_gqa_prefill_cand(
    peers: Peers,
    threads: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    window: int | None = None,
) -> Cand:
    """com.microsoft GroupQueryAttention as causal self-attention (no past; always causal;
    ``local_window_size`` = w for a sliding window; kv_num_heads = num_heads is plain MHA)."""
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_GQA, status=why)
    b, h, n, d = q.shape
    hkv = k.shape[1]
    size = scores_bytes(b, h, n, n)
    if size > ORT_MAX_SCORES:
        return Cand(
            ORT_GQA, status=f"skipped: ORT CPU would hold {fmt_bytes(size)} of probabilities"
        )
    feeds = {
        "query": _bshd(q),
        "key": _bshd(k),
        "value": _bshd(v),
        "seqlens_k": np.full((b,), n - 1, dtype=np.int32),  # total length - 1
        "total_sequence_length": np.array(n, dtype=np.int32),
    }
    build = partial(_gqa_session, ort, onnx, threads, (b, n, h, hkv, d), past=False, window=window)
    return _ort_cand(ORT_GQA, build, feeds, h, d)


def ort_gqa_decode_cand(
    peers: Peers,
    threads: int,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_new: np.ndarray,
    v_new: np.ndarray,
    notes: list[str],
) -> Cand:
    """One GroupQueryAttention decode step: the new token's k/v go to position L of a past
    cache of L tokens, and the query attends over all L + 1 (reference ``"past+new"``).

    The past and present caches share one buffer of L + 1 tokens (IO binding), as in a real
    decode loop: ORT then writes only the new token instead of copying the whole cache. If
    that fails, separate past and present tensors are used (ORT copies the cache every call),
    and ``notes`` says so.
    """
    ort, onnx, why = peers.ort()
    if why:
        return Cand(ORT_GQA, status=why)
    _, h, _, d = q.shape
    _, hkv, length, _ = k.shape
    try:
        sess = _gqa_session(ort, onnx, threads, (1, 1, h, hkv, d), past=True, window=None)
    except Exception as exc:  # noqa: BLE001
        return Cand(ORT_GQA, status=f"failed: {short(exc)}")
    feeds = {
        "query": np.ascontiguousarray(q.reshape(1, 1, h * d)),  # (1, H, 1, D) == (1, 1, H*D)
        "key": np.ascontiguousarray(k_new.reshape(1, 1, hkv * d)),
        "value": np.ascontiguousarray(v_new.reshape(1, 1, hkv * d)),
        "seqlens_k": np.array([length], dtype=np.int32),  # total length - 1
        "total_sequence_length": np.array(length + 1, dtype=np.int32),
    }
    unpack = _unpack(h, d)
    try:
        buf_k = np.empty((1, hkv, length + 1, d), dtype=np.float32)
        buf_v = np.empty_like(buf_k)
        buf_k[:, :, :length] = k
        buf_v[:, :, :length] = v
        ov_k = ort.OrtValue.ortvalue_from_numpy(buf_k)
        ov_v = ort.OrtValue.ortvalue_from_numpy(buf_v)
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("past_key", ov_k)
        binding.bind_ortvalue_input("past_value", ov_v)
        binding.bind_output("output")
        binding.bind_ortvalue_output("present_key", ov_k)
        binding.bind_ortvalue_output("present_value", ov_v)
        keep = (buf_k, buf_v, ov_k, ov_v)

        def run_shared() -> np.ndarray:
            sess.run_with_iobinding(binding)
            assert keep  # the buffers live as long as this closure
            return unpack(binding.get_outputs()[0].numpy())

        run_shared()
        if not np.array_equal(buf_k[:, :, length], k_new[:, :, 0]):
            raise RuntimeError("present_key was not written into the shared buffer")
        return Cand(ORT_GQA, run_shared, ref="past+new")
    except Exception as exc:  # noqa: BLE001 (fall back to separate past/present)
        notes.append(f"ort: shared past/present buffer failed ({short(exc, 100)}); copies")
    full = dict(feeds, past_key=k, past_value=v)
    return Cand(ORT_GQA, lambda: unpack(sess.run(["output"], full)[0]), ref="past+new")
