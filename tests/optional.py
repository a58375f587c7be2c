"""Optional dependencies of the tests (torch, transformers, Ray) and the tiny models they share.

Where a package is absent its tests skip with the reason and the extra that installs it. CI
installs every extra and sets ``FERROATTN_REQUIRE_EXTRAS=1``, which turns those skips into
failures, so a missing install step cannot hide tests there.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import pytest


def require(name: str, extra: str = "hf") -> ModuleType:
    """Imports ``name``, or skips the calling module (fails under FERROATTN_REQUIRE_EXTRAS=1)."""
    if os.environ.get("FERROATTN_REQUIRE_EXTRAS") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"FERROATTN_REQUIRE_EXTRAS=1 but {name} cannot be imported: {e}", False)
    reason = f"{name} is not installed (pip install ferroattn[{extra}])"
    return pytest.importorskip(name, reason=reason)


def tiny_config(cls: Any, **extra: Any) -> Any:
    """A transformers config of ``cls`` small enough for tests (random weights, no downloads)."""
    common: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    common.update(extra)
    return cls(**common)
