"""Multi-head self-attention layer: projections, RoPE, ferroattn kernels, output projection."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from ._args import as_array, int_vector, mask_options
from ._dispatch import on_tensor_views, tensor_among, to_numpy
from .functional import Causal, Window, attention, attention_varlen
from .kv_cache import KVCache
from .precision import Precision, check_precision
from .rope import rope
from .variants import T5Bias, normalize_variants

__all__ = ["SelfAttention"]

# Key names of the four projections, per checkpoint family, tried in this order.
_STATE_DICT_STYLES: tuple[tuple[str, str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, Gemma
    ("self.query", "self.key", "self.value", "output.dense"),  # BERT (…attention.)
    ("query", "key", "value", "output.dense"),
)


def _to_numpy(name: str, value: Any) -> np.ndarray:
    """An ndarray from a NumPy array or a torch tensor (without importing torch)."""
    if tensor_among(value):
        # bfloat16 comes as ml_dtypes.bfloat16 (or widened to float32 without it): the layer
        # keeps float32 either way.
        return to_numpy(value)
    return as_array(name, value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _float_array(name: str, value: Any, ndim: int) -> np.ndarray:
    arr = _to_numpy(name, value)
    if not (arr.dtype.kind == "f" or arr.dtype.name == "bfloat16"):
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    # One contiguous float32 copy per weight: the projections always run in float32.
    return np.ascontiguousarray(arr, dtype=np.float32)


def _weight(name: str, value: Any, shape: tuple[int, int], meaning: str) -> np.ndarray:
    w = _float_array(name, value, 2)
    if w.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}), got {w.shape}")
    return w


def _bias(name: str, value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    b = _float_array(name, value, 1)
    if b.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (out_features of its weight), got {b.shape}"
        )
    return b


def _window_left(window: Any) -> int | None:
    """How many past keys a window lets a causal query see besides its own (None: all)."""
    return mask_options(
        head_dim=1, causal=True, window=window, scale=None, softcap=None
    ).window_left


class SelfAttention:
    """Multi-head (grouped-query) self-attention with ``torch.nn.Linear``-style weights.

    ``y = x @ W.T + b`` for the four projections, ``W`` of shape ``(out_features, in_features)``.
    Weights are kept as float32 and all matmuls run in float32; the output has ``x``'s dtype.

    Args:
        w_q: ``(num_heads · head_dim, d_model)``.
        w_k: ``(num_kv_heads · head_dim, d_model)``.
        w_v: ``(num_kv_heads · head_dim, d_model)``.
        w_o: ``(d_model, num_heads · head_dim)``.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA/MQA); must divide ``num_heads``. Default
            ``num_heads``.
        head_dim: default ``w_q.shape[0] // num_heads``.
        b_q, b_k, b_v, b_o: optional biases of shape ``(out_features,)``.
        causal: ``True`` for a decoder (each token sees itself and earlier tokens), ``False``
            for an encoder (BERT). ``step`` needs a causal layer.
        rope_theta: apply rotary embeddings with this base to queries and keys (``None``: no
            RoPE, e.g. BERT's learned absolute positions, which live outside this layer).
        rope_interleaved: RoPE pairs ``(2i, 2i+1)`` (GPT-J, Meta's checkpoints) instead of
            ``(i, i + head_dim/2)`` (GPT-NeoX, Hugging Face Llama).
        window: sliding window as in :func:`ferroattn.attention` (an int ``w``: the last ``w``
            tokens, Mistral's ``sliding_window``).
        softcap: ``c``: scores become ``c·tanh(score/c)`` (Gemma 2).
        scale: multiplies ``q·k``; default ``1/sqrt(head_dim)``.
        alibi_slopes, sinks, rel_bias: per-head ALiBi slopes, sink logits and a
            :class:`ferroattn.T5Bias`, as in :func:`ferroattn.attention` (used by
            :meth:`forward` and :meth:`step` alike).
        precision: how the attention multiplies float32, as in :func:`ferroattn.attention`;
            None (default) follows :func:`ferroattn.get_float32_precision` at each call. The
            projections always run in float32.

    Raises:
        ValueError: a weight or bias of the wrong shape (named, with its shape), ``num_heads``
            not dividing ``w_q.shape[0]``, ``num_kv_heads`` not dividing ``num_heads``, an odd
            ``head_dim`` with RoPE, bad mask options.
        TypeError: non-float weights, non-int head counts.

    Example:
        >>> import numpy as np
        >>> from ferroattn.layer import SelfAttention
        >>> rng = np.random.default_rng(0)
        >>> d, h, hkv, hd = 64, 4, 2, 16
        >>> w = lambda o, i: rng.standard_normal((o, i), dtype=np.float32) / np.sqrt(i)
        >>> layer = SelfAttention(w(h * hd, d), w(hkv * hd, d), w(hkv * hd, d), w(d, h * hd),
        ...                       num_heads=h, num_kv_heads=hkv, rope_theta=10000.0)
        >>> x = rng.standard_normal((2, 10, d), dtype=np.float32)
        >>> layer.forward(x).shape
        (2, 10, 64)
        >>> cache = layer.new_cache(2, capacity=32)   # decoding: prefill 7 tokens, then 1 more
        >>> layer.step(x[:, :7], cache).shape, layer.step(x[:, 7:8], cache).shape
        ((2, 7, 64), (2, 1, 64))
    """

    def __init__(
        self,
        w_q: Any,
        w_k: Any,
        w_v: Any,
        w_o: Any,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        b_q: Any = None,
        b_k: Any = None,
        b_v: Any = None,
        b_o: Any = None,
        causal: Causal = True,
        rope_theta: float | None = None,
        rope_interleaved: bool = False,
        window: Window = None,
        softcap: float | None = None,
        scale: float | None = None,
        alibi_slopes: Any = None,
        sinks: Any = None,
        rel_bias: T5Bias | None = None,
        precision: Precision | None = None,
    ) -> None:
        h = _positive_int("num_heads", num_heads)
        hkv = h if num_kv_heads is None else _positive_int("num_kv_heads", num_kv_heads)
        if h % hkv:
            raise ValueError(
                f"num_kv_heads ({hkv}) must divide num_heads ({h}): each KV head serves a "
                "whole group of query heads"
            )
        wq = _float_array("w_q", w_q, 2)
        if head_dim is None:
            if wq.shape[0] % h:
                raise ValueError(
                    f"num_heads ({h}) must divide w_q.shape[0] (num_heads · head_dim); "
                    f"w_q has shape {wq.shape}"
                )
            hd = wq.shape[0] // h
        else:
            hd = _positive_int("head_dim", head_dim)
        if hd < 1:
            raise ValueError(f"w_q has shape {wq.shape}: no room for {h} heads")
        d_model = wq.shape[1]
        _weight("w_q", wq, (h * hd, d_model), "num_heads · head_dim, d_model")
        wk = _weight("w_k", w_k, (hkv * hd, d_model), "num_kv_heads · head_dim, d_model")
        wv = _weight("w_v", w_v, (hkv * hd, d_model), "num_kv_heads · head_dim, d_model")
        self._w_o = _weight("w_o", w_o, (d_model, h * hd), "d_model, num_heads · head_dim")
        biases = (
            _bias("b_q", b_q, h * hd),
            _bias("b_k", b_k, hkv * hd),
            _bias("b_v", b_v, hkv * hd),
        )
        self._b_o = _bias("b_o", b_o, d_model)

        # Validate the mask options now rather than at the first forward.
        mask_options(head_dim=hd, causal=causal, window=window, scale=scale, softcap=softcap)
        if rope_theta is not None:
            try:
                theta = float(rope_theta)
            except (TypeError, ValueError) as e:
                raise TypeError(f"rope_theta must be a number, got {rope_theta!r}") from e
            if not (math.isfinite(theta) and theta > 0):
                raise ValueError(f"rope_theta must be a positive finite number, got {rope_theta}")
            if hd % 2:
                raise ValueError(f"RoPE needs an even head_dim, got {hd}")
            rope_theta = theta

        # One fused (q|k|v) matrix: one matmul per call, and heads come out as views of it.
        self._w_qkv = np.concatenate([wq, wk, wv])
        if all(b is None for b in biases):
            self._b_qkv: np.ndarray | None = None
        else:
            sizes = (h * hd, hkv * hd, hkv * hd)
            self._b_qkv = np.concatenate(
                [
                    np.zeros(n, np.float32) if b is None else b
                    for b, n in zip(biases, sizes, strict=True)
                ]
            )
        self._has_bias = tuple(b is not None for b in biases)

        self.num_heads = h
        self.num_kv_heads = hkv
        self.head_dim = hd
        self.d_model = d_model
        self.causal = causal
        self.rope_theta = rope_theta
        self.rope_interleaved = bool(rope_interleaved)
        self.window = window
        self.softcap = softcap
        self.scale = scale
        # Score terms (see ferroattn.attention), checked once here.
        normalize_variants(
            shape4=(1, h, 1, 1), ndim=4, alibi_slopes=alibi_slopes, sinks=sinks, rel_bias=rel_bias
        )
        self.alibi_slopes = None if alibi_slopes is None else np.asarray(alibi_slopes, np.float32)
        self.sinks = None if sinks is None else np.asarray(sinks, np.float32)
        self.rel_bias = rel_bias
        self.precision: Precision | None = None
        if precision is not None:
            self.precision = cast(Precision, check_precision(precision))

    # ------------------------------------------------------------------ weights

    def _qkv_slice(self, i: int) -> slice:
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        bounds = (0, h * hd, (h + hkv) * hd, (h + 2 * hkv) * hd)
        return slice(bounds[i], bounds[i + 1])

    @property
    def w_q(self) -> np.ndarray:
        return self._w_qkv[self._qkv_slice(0)]

    @property
    def w_k(self) -> np.ndarray:
        return self._w_qkv[self._qkv_slice(1)]

    @property
    def w_v(self) -> np.ndarray:
        return self._w_qkv[self._qkv_slice(2)]

    @property
    def w_o(self) -> np.ndarray:
        return self._w_o

    def _bias_of(self, i: int) -> np.ndarray | None:
        if self._b_qkv is None or not self._has_bias[i]:
            return None
        return self._b_qkv[self._qkv_slice(i)]

    @property
    def b_q(self) -> np.ndarray | None:
        return self._bias_of(0)

    @property
    def b_k(self) -> np.ndarray | None:
        return self._bias_of(1)

    @property
    def b_v(self) -> np.ndarray | None:
        return self._bias_of(2)

    @property
    def b_o(self) -> np.ndarray | None:
        return self._b_o

    def __repr__(self) -> str:
        opts = [
            f"d_model={self.d_model}",
            f"num_heads={self.num_heads}",
            f"num_kv_heads={self.num_kv_heads}",
            f"head_dim={self.head_dim}",
            f"causal={self.causal!r}",
        ]
        for name in ("rope_theta", "window", "softcap", "scale"):
            if getattr(self, name) is not None:
                opts.append(f"{name}={getattr(self, name)!r}")
        if self.rope_theta is not None and self.rope_interleaved:
            opts.append("rope_interleaved=True")
        return f"SelfAttention({', '.join(opts)})"

    # ------------------------------------------------------------------ pieces

    def _check_x(self, x: Any) -> np.ndarray:
        x = as_array("x", x)
        if not (x.dtype.kind == "f" or x.dtype.name == "bfloat16"):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if x.ndim != 3 or x.shape[2] != self.d_model:
            raise ValueError(
                f"x must have shape (batch, tokens, d_model={self.d_model}), got {x.shape}"
            )
        return x

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q, k, v as ``(B, N, heads, head_dim)`` float32 views of one fused projection."""
        b, n, _ = x.shape
        y = x.reshape(b * n, self.d_model).astype(np.float32, copy=False) @ self._w_qkv.T
        if self._b_qkv is not None:
            y += self._b_qkv
        y = y.reshape(b, n, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        h, hkv = self.num_heads, self.num_kv_heads
        return y[:, :, :h], y[:, :, h : h + hkv], y[:, :, h + hkv :]

    def _rope_in_place(self, t: np.ndarray, positions: np.ndarray) -> None:
        """Rotate ``t`` ``(B, N, heads, hd)``; positions ``(N,)`` or ``(B, N)``."""
        heads_first = t.transpose(0, 2, 1, 3)
        rope(
            heads_first,
            positions,
            theta=self.rope_theta,  # type: ignore[arg-type]
            interleaved=self.rope_interleaved,
            out=heads_first,
        )

    def _output(self, o: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Merge heads of ``o`` ``(B, N, H, hd)`` and apply the output projection."""
        b, n = o.shape[:2]
        y = o.reshape(b * n, self.num_heads * self.head_dim) @ self._w_o.T
        if self._b_o is not None:
            y += self._b_o
        return y.reshape(b, n, self.d_model).astype(dtype, copy=False)

    def _mask_kwargs(self) -> dict[str, Any]:
        return {
            "causal": self.causal,
            "window": self.window,
            "scale": self.scale,
            "softcap": self.softcap,
            "precision": self.precision,
        }

    def _score_terms(self) -> dict[str, Any]:
        terms = {"alibi_slopes": self.alibi_slopes, "sinks": self.sinks, "rel_bias": self.rel_bias}
        return {name: value for name, value in terms.items() if value is not None}

    # ------------------------------------------------------------------ API

    def forward(self, x: Any, *, kv_lengths: Any = None) -> np.ndarray:
        """Self-attention over whole sequences.

        Args:
            x: ``(B, N, d_model)``, any float dtype (computed in float32).
            kv_lengths: ``(B,)`` integers in ``[0, N]``: sequence ``b`` is right-padded after
                ``kv_lengths[b]`` tokens. Padded keys are never attended to and valid tokens
                keep positions ``0, 1, …`` (for RoPE and the causal mask), so valid rows equal
                the unpadded result. Padded rows get an attention output of 0, i.e. the layer
                returns ``b_o`` (or 0) there.

        Returns:
            ``(B, N, d_model)`` in ``x``'s dtype; a torch tensor on ``x``'s device when ``x``
            is one (CPU tensors are read in place; others are copied to the CPU and back).

        Example:
            >>> import numpy as np
            >>> from ferroattn.layer import SelfAttention
            >>> w = np.eye(8, dtype=np.float32)
            >>> x = np.ones((1, 3, 8), np.float32)
            >>> SelfAttention(w, w, w, w, num_heads=2).forward(x, kv_lengths=[2])[0, 2].tolist()
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        """
        if tensor_among(x):
            return on_tensor_views(self.forward, x, kv_lengths=kv_lengths)
        x = self._check_x(x)
        b, n, _ = x.shape
        q, k, v = self._project(x)
        if self.rope_theta is not None:
            positions = np.arange(n)
            self._rope_in_place(q, positions)
            self._rope_in_place(k, positions)
        if kv_lengths is None:
            o = cast(
                np.ndarray,
                attention(q, k, v, layout="bshd", **self._mask_kwargs(), **self._score_terms()),
            )
        else:
            o = self._attend_padded(q, k, v, kv_lengths)
        return self._output(o, x.dtype)

    __call__ = forward

    def _attend_padded(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_lengths: Any
    ) -> np.ndarray:
        # attention(kv_lengths=) aligns causal/window masks bottom-right on the valid length,
        # which would shift right-padded queries; packing the valid tokens (varlen) keeps every
        # sequence's queries at positions 0..len-1 and skips the padded rows altogether.
        b, n = q.shape[:2]
        lens = np.asarray(int_vector("kv_lengths", kv_lengths, b), dtype=np.int64)
        if lens.size and lens.max() > n:
            raise ValueError(
                f"kv_lengths must lie in [0, {n}] (the sequence length of x), got {lens.tolist()}"
            )
        valid = (np.arange(n) < lens[:, None]).ravel()
        cu = np.concatenate([[0], np.cumsum(lens)])

        def packed(t: np.ndarray) -> np.ndarray:
            return t.reshape(b * n, *t.shape[2:])[valid]

        terms = self._score_terms()
        if terms:
            # Varlen takes no score terms: one call per sequence keeps positions 0..len-1.
            o4 = np.zeros((b, n, self.num_heads, self.head_dim), np.float32)
            for i, m in enumerate(lens.tolist()):
                if m:
                    o4[i, :m] = attention(
                        q[i, :m], k[i, :m], v[i, :m], layout="bshd", **self._mask_kwargs(), **terms
                    )
            return o4
        o = np.zeros((b * n, self.num_heads, self.head_dim), np.float32)
        o[valid] = attention_varlen(packed(q), packed(k), packed(v), cu, cu, **self._mask_kwargs())
        return o.reshape(b, n, self.num_heads, self.head_dim)

    def step(self, x: Any, cache: KVCache, *, lengths: Any = None) -> np.ndarray:
        """Decode the next ``T`` tokens of each sequence against (and into) a KV cache.

        The new tokens of sequence ``b`` sit at positions ``cache.lengths[b] + 0..T-1`` (for
        RoPE); their keys and values are appended to ``cache``, then each new query attends
        causally to everything the cache holds. Feeding a sequence in any split of chunks gives
        the same result as one causal :meth:`forward` over the whole sequence.

        Args:
            x: ``(B, T, d_model)``: the next ``T`` tokens of each of the cache's ``B`` sequences.
            cache: a :class:`ferroattn.KVCache` from :meth:`new_cache` (or built with this
                layer's ``num_kv_heads`` and ``head_dim``). A windowed layer needs a cache with
                the same window, since the cache does the windowing; a cache with a window (and
                sinks) under a layer without one is allowed (streaming).
            lengths: ``(B,)`` valid new tokens per sequence (right padding of ``x``, for ragged
                batches); default ``T``. Padded rows are not cached and return ``b_o`` (or 0).

        Returns:
            ``(B, T, d_model)`` in ``x``'s dtype (a torch tensor when ``x`` is one).

        Raises:
            ValueError: a non-causal layer, a cache of another shape, a window mismatch, a
                full cache.

        Example:
            >>> import numpy as np
            >>> from ferroattn.layer import SelfAttention
            >>> w = np.eye(8, dtype=np.float32)
            >>> layer = SelfAttention(w, w, w, w, num_heads=2, rope_theta=10000.0)
            >>> x = np.random.default_rng(0).standard_normal((1, 5, 8), dtype=np.float32)
            >>> cache = layer.new_cache(1, capacity=16)
            >>> y = np.concatenate([layer.step(x[:, :3], cache), layer.step(x[:, 3:], cache)], 1)
            >>> bool(np.allclose(y, layer.forward(x), atol=1e-6)), int(cache.lengths[0])
            (True, 5)
        """
        if not self.causal:
            raise ValueError("step() decodes causally; this layer has causal=False")
        if tensor_among(x):
            return on_tensor_views(self.step, x, cache=cache, lengths=lengths)
        x = self._check_x(x)
        self._check_cache(cache, x.shape)
        b, t, _ = x.shape
        # Read before the call: the cache advances its lengths when it appends.
        start = np.asarray(cache.lengths, dtype=np.int64)
        q, k, v = self._project(x)
        if self.rope_theta is not None:
            positions = start[:, None] + np.arange(t)
            self._rope_in_place(q, positions)
            self._rope_in_place(k, positions)

        def heads_first(a: np.ndarray) -> np.ndarray:
            return a.transpose(0, 2, 1, 3)

        o = cache.step(
            heads_first(q),
            heads_first(k),
            heads_first(v),
            lengths=lengths,
            scale=self.scale,
            softcap=self.softcap,
            precision=self.precision,
            **self._score_terms(),
        )
        if not isinstance(o, np.ndarray):  # a cache on a torch device
            o = to_numpy(o)
        return self._output(o.transpose(0, 2, 1, 3), x.dtype)

    def _check_cache(self, cache: KVCache, x_shape: tuple[int, ...]) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a ferroattn.KVCache, got {type(cache).__name__}")
        wanted = {
            "batch": x_shape[0],
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "value_dim": self.head_dim,
        }
        for name, want in wanted.items():
            got = getattr(cache, name)
            if got != want:
                raise ValueError(
                    f"cache has {name}={got}, but this layer and x {x_shape} need {name}={want}"
                )
        mine = None if self.window is None else _window_left(self.window)
        if mine is None:
            return
        if cache.window is None:
            raise ValueError(
                f"this layer has window={self.window!r} but the cache has none; create it with "
                "layer.new_cache(...) or KVCache(..., window=...)"
            )
        if _window_left(cache.window) != mine:
            raise ValueError(
                f"this layer has window={self.window!r} but the cache has window={cache.window!r}"
            )

    def new_cache(
        self,
        batch: int,
        capacity: int,
        *,
        dtype: Any = "float32",
        window: int | None = None,
        sinks: int = 0,
        device: Any = None,
    ) -> KVCache:
        """A :class:`ferroattn.KVCache` shaped for this layer.

        Args:
            batch: sequences decoded together.
            capacity: tokens the cache can hold per sequence.
            dtype: storage of keys and values: float32, float16, bfloat16 or int8.
            window: tokens a query sees (an int, as :class:`ferroattn.KVCache` takes it);
                default: the layer's window.
            sinks: attention-sink tokens kept in front of the window (StreamingLLM).
            device: where the cache keeps keys and values (see :class:`ferroattn.KVCache`).

        Example:
            >>> import numpy as np
            >>> from ferroattn.layer import SelfAttention
            >>> w = np.eye(8, dtype=np.float32)
            >>> layer = SelfAttention(w, w[:4], w[:4], w, num_heads=2, num_kv_heads=1, window=4)
            >>> cache = layer.new_cache(3, capacity=64, dtype="float16")
            >>> cache.kv_heads, cache.head_dim, cache.window, cache.dtype
            (1, 4, 4, 'float16')
        """
        if window is None:
            # The cache's window is an int (tokens seen); only the layer's left side matters
            # when decoding causally.
            left = None if self.window is None else _window_left(self.window)
            window = None if left is None else left + 1
        return KVCache(
            batch,
            self.num_kv_heads,
            self.head_dim,
            capacity,
            dtype=dtype,
            window=window,
            sinks=sinks,
            device=device,
        )

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        prefix: str = "",
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        **options: Any,
    ) -> SelfAttention:
        """Build a layer from a (Hugging Face / torch) state dict.

        Looks for ``{prefix}q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Llama, Mistral, Qwen)
        or ``{prefix}self.query``, ``self.key``, ``self.value``, ``output.dense`` (BERT; also
        ``query``, ``key``, ``value`` without ``self.``), each ``.weight`` with an optional
        ``.bias``. Other keys are ignored.

        Args:
            state: mapping of names to NumPy arrays or torch tensors (torch is never imported).
            prefix: e.g. ``"model.layers.0.self_attn."``; a missing final dot is added.
            num_heads, num_kv_heads, head_dim: as in :class:`SelfAttention`.
            **options: the other keyword arguments of :class:`SelfAttention` (``causal``,
                ``rope_theta``, ...). BERT needs ``causal=False``.

        Raises:
            KeyError: a projection weight is missing; the message lists the keys looked for.

        Example:
            >>> layer = SelfAttention.from_state_dict(                     # doctest: +SKIP
            ...     model.state_dict(), "model.layers.0.self_attn.",
            ...     num_heads=32, num_kv_heads=8, rope_theta=500000.0)
        """
        if prefix and not prefix.endswith("."):
            prefix += "."
        style = next(
            (s for s in _STATE_DICT_STYLES if f"{prefix}{s[0]}.weight" in state),
            None,
        )
        if style is None:
            looked = "; ".join(
                ", ".join(f"{prefix}{name}.weight" for name in s) for s in _STATE_DICT_STYLES
            )
            # A wrong prefix is the usual cause: point at where the weights actually are.
            found = sorted(
                {
                    key[: -len(f"{s[0]}.weight")]
                    for key in state
                    if isinstance(key, str)
                    for s in _STATE_DICT_STYLES
                    if key.endswith(f".{s[0]}.weight") or key == f"{s[0]}.weight"
                }
            )
            hint = f" (prefixes that have them: {', '.join(map(repr, found[:3]))})" if found else ""
            raise KeyError(
                f"no attention projection weights in the state dict; looked for {looked}{hint}"
            )
        missing = [
            f"{prefix}{name}.weight" for name in style if f"{prefix}{name}.weight" not in state
        ]
        if missing:
            raise KeyError(
                f"state dict has {prefix}{style[0]}.weight but lacks {', '.join(missing)}"
            )

        def get(name: str, part: str) -> Any:
            return state.get(f"{prefix}{name}.{part}")

        w_q, w_k, w_v, w_o = (get(name, "weight") for name in style)
        biases = dict(
            zip(("b_q", "b_k", "b_v", "b_o"), (get(name, "bias") for name in style), strict=True)
        )
        return cls(
            w_q,
            w_k,
            w_v,
            w_o,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            **biases,
            **options,
        )
