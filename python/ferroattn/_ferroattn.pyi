"""Type stubs of the compiled extension (kept in step with rust/py/src/lib.rs).

The option groups are read by attribute: the protocols below name the fields of the structs in
rust/py/src/args.rs and variants.rs, which the package's own types have
(``_args.MaskOptions``, ``_args.Sequences``, ``variants.Variants``,
``_cache_storage.KVEncoding``). The stub imports none of them: the binding sits below them.
"""

from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__version__: str

class MaskArgs(Protocol):
    @property
    def scale(self) -> float: ...
    @property
    def softcap(self) -> float | None: ...
    @property
    def causal(self) -> bool: ...
    @property
    def top_left(self) -> bool: ...
    @property
    def window_left(self) -> int | None: ...
    @property
    def window_right(self) -> int | None: ...
    @property
    def sink_keys(self) -> int: ...

class SequenceArgs(Protocol):
    @property
    def kv_lengths(self) -> list[int] | None: ...
    @property
    def cu_seqlens_q(self) -> list[int] | None: ...
    @property
    def cu_seqlens_k(self) -> list[int] | None: ...
    @property
    def explicit(self) -> list[tuple[int, int, int, int, int]] | None: ...

class RelBiasArgs(Protocol):
    @property
    def table(self) -> list[float]: ...
    @property
    def num_buckets(self) -> int: ...
    @property
    def max_distance(self) -> int: ...
    @property
    def bidirectional(self) -> bool: ...

class BlockLayoutArgs(Protocol):
    @property
    def layout(self) -> list[int]: ...
    @property
    def heads(self) -> int: ...
    @property
    def block(self) -> int: ...
    @property
    def q_blocks(self) -> int: ...
    @property
    def k_blocks(self) -> int: ...

class VariantArgs(Protocol):
    @property
    def alibi_slopes(self) -> list[float] | None: ...
    @property
    def sinks(self) -> list[float] | None: ...
    @property
    def rel_bias(self) -> RelBiasArgs | None: ...
    @property
    def bias(self) -> np.ndarray | None: ...
    @property
    def mask(self) -> np.ndarray | None: ...
    @property
    def blocks(self) -> BlockLayoutArgs | None: ...

class KvEncodingArgs(Protocol):
    @property
    def kv_dtype(self) -> str: ...
    @property
    def k_scales(self) -> np.ndarray | None: ...
    @property
    def v_scales(self) -> np.ndarray | None: ...

def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    dtype: str,
    mask: MaskArgs,
    *,
    sequences: SequenceArgs | None = None,
    variants: VariantArgs | None = None,
    kv_encoding: KvEncodingArgs | None = None,
    return_lse: bool = False,
) -> npt.NDArray[np.float32] | None: ...
def attention_weights(
    q: np.ndarray,
    k: np.ndarray,
    dtype: str,
    mask: MaskArgs,
    *,
    sequences: SequenceArgs | None = None,
    variants: VariantArgs | None = None,
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
