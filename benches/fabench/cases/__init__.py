"""The harness's cases, one module each (``config.CASES`` lists them in order)."""

from __future__ import annotations

from collections.abc import Callable

from .base import Case, Run, share_ceilings
from .decode import decode
from .hf_generate import hf_generate
from .lowp import lowp
from .memory import memory
from .prefill import prefill, scaling
from .small import small
from .variants import variants
from .window import window

RUNNERS: dict[str, Callable[[Run], Case]] = {
    "prefill": lambda run: prefill(run, causal=False),
    "causal": lambda run: prefill(run, causal=True),
    "small": small,
    "lowp": lowp,
    "window": window,
    "decode": decode,
    "scaling": scaling,
    "memory": memory,
    "variants": variants,
    "hf": hf_generate,
}

__all__ = ["RUNNERS", "Case", "Run", "share_ceilings"]
