"""How float32 attention may multiply: the process-wide default and its per-call override.

Named and valued like :func:`torch.set_float32_matmul_precision`:

- ``"highest"`` (default): float32 products, the same results as before the setting existed.
- ``"high"``: each float32 operand split into a bfloat16 high part and a bfloat16 remainder,
  three bfloat16 products per float32 product (hi·hi + hi·lo + lo·hi) accumulated in float32;
  about 1e-5 relative error.
- ``"medium"``: one bfloat16 product per float32 product, accumulated in float32; about 1e-2
  relative error.

``"high"`` and ``"medium"`` run on CPUs with bfloat16 dot products (AVX-512 BF16:
``ferroattn.info()["bf16_dot"]``) for prefill tiles (many query rows); decode steps, and any
CPU without those instructions, compute in float32 whatever the setting. bfloat16 inputs use
the bfloat16 products whenever the CPU has them (their values are exact in bfloat16).
"""

from __future__ import annotations

from typing import Any, Literal

Precision = Literal["highest", "high", "medium"]

__all__ = ["get_float32_precision", "set_float32_precision"]

_VALUES = ("highest", "high", "medium")
_current: str = "highest"


def check_precision(precision: Any) -> str:
    """``precision`` as one of the three names; None means the process-wide setting."""
    if precision is None:
        return _current
    if not isinstance(precision, str) or precision not in _VALUES:
        raise ValueError(f"precision must be 'highest', 'high' or 'medium', got {precision!r}")
    return precision


def set_float32_precision(precision: Precision) -> None:
    """Sets the precision of float32 attention for calls that do not pass ``precision=``.

    Args:
        precision: ``"highest"``, ``"high"`` or ``"medium"`` (see the module documentation).

    Raises:
        ValueError: for any other value.

    Example:
        >>> import ferroattn
        >>> ferroattn.set_float32_precision("high")
        >>> ferroattn.get_float32_precision()
        'high'
        >>> ferroattn.set_float32_precision("highest")
    """
    global _current
    if precision is None:
        raise ValueError("precision must be 'highest', 'high' or 'medium', got None")
    _current = check_precision(precision)


def get_float32_precision() -> str:
    """The precision float32 attention uses when a call does not pass ``precision=``.

    Example:
        >>> import ferroattn
        >>> ferroattn.get_float32_precision()
        'highest'
    """
    return _current
