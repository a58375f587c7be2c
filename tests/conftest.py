"""Shared pytest configuration for the ferroattn test suite.

Hypothesis profiles (select with HYPOTHESIS_PROFILE=<name>):
  ci        default; moderate example counts, no deadline
  dev       quick local iteration
  thorough  many examples, for occasional deep runs
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Make `import reference` work regardless of pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference import rel_err

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=40, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's node id (stable across runs)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def restore_threads():
    """Restore ferroattn's thread count after a test that changes it."""
    import ferroattn

    before = ferroattn.get_num_threads()
    yield before
    ferroattn.set_num_threads(before)


__all__ = ["rel_err"]
