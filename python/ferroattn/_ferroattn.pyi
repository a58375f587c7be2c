"""Type stubs of the compiled extension (kept in step with rust/py/src/lib.rs).

The option groups are the package's own types, read by attribute (rust/py/src/args.rs and
variants.rs name the same fields).
"""

from typing import Any

import numpy as np
import numpy.typing as npt

from ._args import MaskOptions, Sequences
from ._cache_storage import KVEncoding
from .variants import Variants

__version__: str

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dtype: str,
    mask: MaskOptions,
    *,
    sequences: Sequences | None = None,
    variants: Variants | None = None,
    kv_encoding: KVEncoding | None = None,
    return_lse: bool = False,
) -> npt.NDArray[np.float32] | None: ...
def attention_weights(
    q: np.ndarray,
    k: np.ndarray,
    dtype: str,
    mask: MaskOptions,
    *,
    sequences: Sequences | None = None,
    variants: Variants | None = None,
) -> npt.NDArray[np.float32]: ...
def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def build_info() -> dict[str, Any]: ...
def _after_fork_in_child() -> None: ...
def linear_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dtype: str,
    *,
    causal: bool = False,
    feature_map: str = "elu1",
    eps: float = 1e-6,
    state: tuple[np.ndarray, np.ndarray] | None = None,
) -> None: ...
