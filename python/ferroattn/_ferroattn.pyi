"""Type stubs of the compiled extension (kept in step with rust/py/src/lib.rs)."""

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dtype: str,
    *,
    scale: float,
    kv_dtype: str | None = None,
    k_scales: np.ndarray | None = None,
    v_scales: np.ndarray | None = None,
    softcap: float | None = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int | None = None,
    window_right: int | None = None,
    sink_keys: int = 0,
    kv_lengths: list[int] | None = None,
    cu_seqlens: tuple[list[int], list[int]] | None = None,
    seqs: list[tuple[int, int, int, int, int]] | None = None,
    return_lse: bool = False,
    alibi_slopes: list[float] | None = None,
    sinks: list[float] | None = None,
    rel_bias: tuple[list[float], int, int, bool] | None = None,
    bias: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    blocks: tuple[list[int], int, int, int, int] | None = None,
    precision: str = "highest",
) -> npt.NDArray[np.float32] | None: ...
def attention_weights(
    q: np.ndarray,
    k: np.ndarray,
    dtype: str,
    *,
    scale: float,
    softcap: float | None = None,
    causal: bool = False,
    top_left: bool = False,
    window_left: int | None = None,
    window_right: int | None = None,
    kv_lengths: list[int] | None = None,
    alibi_slopes: list[float] | None = None,
    sinks: list[float] | None = None,
    rel_bias: tuple[list[float], int, int, bool] | None = None,
    bias: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    blocks: tuple[list[int], int, int, int, int] | None = None,
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
