"""Linear attention: ``φ(q)ᵀS / (φ(q)ᵀz + eps)`` in ``O(N·D·Dv)``, and its recurrent form.

With a positive feature map ``φ`` in place of the softmax, the keys and values fold into a
``D × Dv`` state ``S = Σ φ(k_j) v_jᵀ`` and a normalizer ``z = Σ φ(k_j)`` (Katharopoulos et al.,
"Transformers are RNNs", 2020). The causal form is computed as a chunked scan in Rust (never an
``N × N`` matrix); :class:`LinearAttentionState` keeps ``S`` and ``z`` between calls, so decoding
costs ``O(D·Dv)`` per token whatever the length of the history.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _ferroattn
from ._args import (
    as_array,
    as_is,
    dtype_code,
    from_bhsd_shape,
    kernel_views,
    output_array,
    prepare,
    to_bhsd,
)
from ._memory import empty, zeros

__all__ = ["LinearAttentionState", "linear_attention"]

FEATURE_MAPS = ("elu1", "relu")


def _check_feature_map(feature_map: Any) -> str:
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be 'elu1' or 'relu', got {feature_map!r}")
    return feature_map


def _check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (numbers.Real, np.floating)):
        raise TypeError(f"eps must be a number, got {eps!r}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if np.float32(value) == 0:
        raise ValueError(f"eps must be representable in float32 (> ~1.4e-45), got {eps!r}")
    return value


def _check_causal(causal: Any) -> bool:
    if isinstance(causal, (bool, np.bool_)):
        return bool(causal)
    raise TypeError(f"causal must be a bool, got {causal!r}")


def _prepare(q: Any, k: Any, v: Any) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype, int]:
    """User arrays, their 4-D views (checked, not converted: see :func:`kernel_views`), the common
    dtype and the rank."""
    return prepare({"q": q, "k": k, "v": v}, "bhsd", as_array, as_is)


def _run(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    out4: np.ndarray,
    *,
    causal: bool,
    feature_map: str,
    eps: float,
    state: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Call the kernel, writing into ``out4`` when it is kernel-writable, else via a buffer."""
    direct = (
        dtype_code(out4) == dtype_code(q4)
        and (out4.shape[-1] <= 1 or out4.strides[-1] == out4.itemsize)
        and out4.flags.aligned
    )
    target = out4 if direct else empty("out (a float32 buffer for it)", out4.shape, q4.dtype)
    _ferroattn.linear_attention(
        q4,
        k4,
        v4,
        target,
        q4.dtype.name,
        causal=causal,
        feature_map=feature_map,
        eps=eps,
        state=state,
    )
    if not direct:
        out4[...] = target


def linear_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Linear attention, ``out_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps)``.

    ``S = Σ_j φ(k_j) v_jᵀ`` (``D × Dv``) and ``z = Σ_j φ(k_j)``, summed over all keys, or with
    ``causal`` over ``j <= i``. ``φ`` applies elementwise to queries and keys. Time
    ``O(N·D·Dv)``, memory ``O(D·Dv)`` per head: no ``N × N`` matrix exists. There is no
    ``scale``: the normalizer ``φ(q)ᵀz`` takes the softmax's place.

    Args:
        q: queries ``(B, Hq, N, D)``; also ``(H, N, D)`` or ``(N, D)``.
        k: keys ``(B, Hkv, M, D)``; ``Hq`` must be a multiple of ``Hkv`` (query head ``h``
            uses key/value head ``h // (Hq // Hkv)``).
        v: values ``(B, Hkv, M, Dv)``.
        causal: query ``i`` sums keys ``j <= i`` only; needs ``N == M``.
        feature_map: ``"elu1"`` (``elu(x) + 1``, always positive) or ``"relu"``
            (``max(x, 0)``). With ``"relu"`` a query or the keys it sees can have no positive
            entry in common, so the denominator is 0: ``eps`` keeps the row finite (it is 0).
        eps: added to every denominator; a positive number.
        out: array of the output's shape and dtype to write into (returned as is).

    Returns:
        ``(B, Hq, N, Dv)`` (or the input's rank) in ``q``'s dtype. float32, float16 and
        bfloat16 are accumulated in float32; float64 is computed in float32 and cast back.

    Example:
        >>> import numpy as np, ferroattn
        >>> x = np.random.default_rng(0).standard_normal((1, 4, 1000, 32), dtype=np.float32)
        >>> ferroattn.linear_attention(x, x, x, causal=True).shape
        (1, 4, 1000, 32)
    """
    is_causal = _check_causal(causal)
    fm = _check_feature_map(feature_map)
    eps_f = _check_eps(eps)
    arrays, (q4, k4, v4), dtype, ndim = _prepare(q, k, v)
    b, hq, n, _ = q4.shape
    if is_causal and n != k4.shape[2]:
        raise ValueError(
            f"causal linear attention needs as many queries as keys; "
            f"got q {arrays[0].shape}, k {arrays[1].shape}"
        )
    user_shape = from_bhsd_shape((b, hq, n, v4.shape[3]), ndim, "bhsd")
    result = output_array(out, user_shape, dtype, arrays)
    q4, k4, v4 = kernel_views(q4, k4, v4)
    _run(q4, k4, v4, to_bhsd("out", result, "bhsd"), causal=is_causal, feature_map=fm, eps=eps_f)
    return result


def _positive_int(name: str, x: Any) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


class LinearAttentionState:
    """The recurrent form of causal linear attention, for decoding in ``O(1)`` per token.

    Holds ``S`` (``(batch, kv_heads, head_dim, value_dim)``) and ``z`` (``(batch, kv_heads,
    head_dim)``) in float32. :meth:`step` feeds tokens in order: each attends to everything fed
    before and to itself, exactly as :func:`linear_attention` with ``causal=True`` over the whole
    sequence would (up to float32 rounding).

    Args:
        batch: number of sequences.
        heads: query heads ``Hq``.
        head_dim: dimension ``D`` of queries and keys.
        value_dim: dimension ``Dv`` of values, default ``head_dim``.
        kv_heads: key/value heads ``Hkv`` (``heads`` must be a multiple), default ``heads``.
        feature_map: ``"elu1"`` or ``"relu"``, as in :func:`linear_attention`.
        eps: added to every denominator.

    Example:
        >>> import numpy as np, ferroattn
        >>> state = ferroattn.LinearAttentionState(1, 4, 16, kv_heads=2)
        >>> rng = np.random.default_rng(0)
        >>> q = rng.standard_normal((1, 4, 1, 16), dtype=np.float32)
        >>> k, v = rng.standard_normal((2, 1, 2, 1, 16), dtype=np.float32)
        >>> state.step(q, k, v).shape   # one token: (B, Hq, 1, Dv)
        (1, 4, 1, 16)
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        value_dim: int | None = None,
        *,
        kv_heads: int | None = None,
        feature_map: str = "elu1",
        eps: float = 1e-6,
    ) -> None:
        self.batch = _positive_int("batch", batch)
        self.heads = _positive_int("heads", heads)
        self.head_dim = _positive_int("head_dim", head_dim)
        self.value_dim = (
            self.head_dim if value_dim is None else _positive_int("value_dim", value_dim)
        )
        self.kv_heads = self.heads if kv_heads is None else _positive_int("kv_heads", kv_heads)
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        self.feature_map = _check_feature_map(feature_map)
        self.eps = _check_eps(eps)
        b, h, d = self.batch, self.kv_heads, self.head_dim
        what = (
            f"the state of batch={b}, heads={self.heads}, kv_heads={h}, head_dim={d}, "
            f"value_dim={self.value_dim}"
        )
        self._s = zeros(what, (b, h, d, self.value_dim), np.float32)
        # 4-D for the kernel: (B, Hkv, 1, D).
        self._z = zeros(what, (b, h, 1, d), np.float32)

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of ``S`` ``(B, Hkv, D, Dv)`` and ``z`` ``(B, Hkv, D)``, float32."""
        return self._s.copy(), self._z[:, :, 0, :].copy()

    @property
    def nbytes(self) -> int:
        """Bytes held by the state."""
        return int(self._s.nbytes + self._z.nbytes)

    def reset(self, seq: int | None = None) -> None:
        """Forget everything (or only sequence ``seq`` of the batch)."""
        if seq is None:
            self._s[...] = 0
            self._z[...] = 0
            return
        if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, (numbers.Integral, np.integer)):
            raise TypeError(f"seq must be an int, got {seq!r}")
        if not 0 <= seq < self.batch:
            raise ValueError(f"seq must lie in [0, {self.batch}), got {seq}")
        self._s[seq] = 0
        self._z[seq] = 0

    def step(self, q: Any, k: Any, v: Any, *, out: np.ndarray | None = None) -> np.ndarray:
        """Feed ``T`` tokens in order; return their outputs.

        Args:
            q: ``(B, Hq, T, D)``; ``(Hq, T, D)`` when ``batch == 1``; ``(T, D)`` when also
                ``Hq == Hkv == 1``.
            k: ``(B, Hkv, T, D)`` (same rank as ``q``).
            v: ``(B, Hkv, T, Dv)``.
            out: array of the output's shape and dtype to write into (returned as is).

        Returns:
            ``(B, Hq, T, Dv)`` (or the input's rank) in ``q``'s dtype: token ``t`` attends to
            every token fed before this call and to tokens ``0..t`` of this one.
        """
        arrays, (q4, k4, v4), dtype, ndim = _prepare(q, k, v)
        b, h, hk, d, dv = self.batch, self.heads, self.kv_heads, self.head_dim, self.value_dim
        t = q4.shape[2]
        shapes = ", ".join(f"{n} {a.shape}" for n, a in zip("qkv", arrays, strict=True))
        for name, got, want in (
            ("q", q4.shape, (b, h, t, d)),
            ("k", k4.shape, (b, hk, t, d)),
            ("v", v4.shape, (b, hk, t, dv)),
        ):
            if got != want:
                raise ValueError(
                    f"{name} must have shape (batch={b}, heads={want[1]}, tokens, {want[3]}) "
                    f"with as many tokens as q ({t}); got {shapes}"
                )
        user_shape = from_bhsd_shape((b, h, t, dv), ndim, "bhsd")
        result = output_array(out, user_shape, dtype, arrays)
        q4, k4, v4 = kernel_views(q4, k4, v4)
        _run(
            q4,
            k4,
            v4,
            to_bhsd("out", result, "bhsd"),
            causal=True,
            feature_map=self.feature_map,
            eps=self.eps,
            state=(self._s, self._z),
        )
        return result

    def __repr__(self) -> str:
        return (
            f"LinearAttentionState(batch={self.batch}, heads={self.heads}, "
            f"head_dim={self.head_dim}, value_dim={self.value_dim}, kv_heads={self.kv_heads}, "
            f"feature_map={self.feature_map!r}, eps={self.eps})"
        )
