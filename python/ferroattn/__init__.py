"""ferroattn: fast self-attention on the CPU.

Flash-style blocked kernels in Rust (online softmax, SIMD chosen at run time, threads over
independent tiles) behind a NumPy API: arrays in, arrays out, dtype kept.

Example:
    >>> import numpy as np, ferroattn
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 8, 256, 64), dtype=np.float32) for _ in range(3))
    >>> out = ferroattn.attention(q, k, v, causal=True)
"""

from __future__ import annotations

import numbers
import os
import warnings
from typing import Any

from . import _ferroattn
from .functional import attention, attention_varlen, attention_weights
from .kv_cache import KVCache
from .layer import SelfAttention
from .linear import LinearAttentionState, linear_attention
from .merge import merge_partials
from .paged import paged_attention, paged_attention_varlen, paged_write
from .paged_cache import PagedKVCache
from .plot import plot_attention, render_attention
from .precision import get_float32_precision, set_float32_precision
from .rope import rope
from .variants import (
    T5Bias,
    alibi_slopes,
    bigbird_layout,
    local_global_layout,
    strided_layout,
)

__version__: str = _ferroattn.__version__

__all__ = [
    "KVCache",
    "LinearAttentionState",
    "PagedKVCache",
    "SelfAttention",
    "T5Bias",
    "__version__",
    "alibi_slopes",
    "attention",
    "attention_varlen",
    "attention_weights",
    "bigbird_layout",
    "get_float32_precision",
    "get_num_threads",
    "info",
    "linear_attention",
    "local_global_layout",
    "merge_partials",
    "paged_attention",
    "paged_attention_varlen",
    "paged_write",
    "plot_attention",
    "render_attention",
    "rope",
    "set_float32_precision",
    "set_num_threads",
    "strided_layout",
]


# Far more threads than any CPU has cores (oversubscription past a few per core only adds
# switching); a larger count is a mistake, and the pool would spend seconds starting it.
MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Set the number of threads ferroattn's kernels use (its own pool; default: all cores,
    or ``FERROATTN_NUM_THREADS``). ``n`` is an int (a NumPy int too) in ``[1, 4096]``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):  # NumPy ints are Integral
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"n must be at most {MAX_THREADS}, got {n}")
    _ferroattn.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads ferroattn's kernels use."""
    return int(_ferroattn.get_num_threads())


def info() -> dict[str, Any]:
    """Version, SIMD path in use, paths this CPU can run, CPU features, threads.

    ``stream_prefetch_bytes`` and ``one_row_stream_prefetch`` say how decoding requests its
    K and V streams ahead on this CPU, picked by CPU vendor (``docs/performance.md``, "Stream
    requests and their distance by vendor" and "One-row streams and ONE_ROW_KEYS").

    ``bf16_dot`` says whether prefill tiles of bfloat16 inputs (and of float32 inputs at a
    lower :func:`set_float32_precision`) run on bfloat16 dot products (AVX-512 BF16's
    ``vdpbf16ps``; ``FERROATTN_BF16DOT=0`` turns them off). ``amx`` is always False: there is
    no AMX tile path yet.

    Never imports torch (``ferroattn info`` on the command line reports torch as well).
    """
    return dict(_ferroattn.build_info())


def _warn_on_unknown_isa() -> None:
    wanted = os.environ.get("FERROATTN_ISA", "").strip().lower()
    if not wanted:
        return
    facts = _ferroattn.build_info()
    if wanted != facts["isa"]:
        warnings.warn(
            f"FERROATTN_ISA={wanted!r} is not available on this CPU (available: "
            f"{', '.join(facts['isa_available'])}); using {facts['isa']!r}",
            RuntimeWarning,
            stacklevel=2,
        )


_warn_on_unknown_isa()

# A forked child has none of the parent's pool threads: start a fresh pool there.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ferroattn._after_fork_in_child)
