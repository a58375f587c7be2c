"""A transformers ``Cache`` whose layers are :class:`ferroattn.KVCache` storage.

transformers' ``DynamicCache`` concatenates every layer's keys and values into fresh tensors
each token: the copy costs as much as the attention that reads it, and the attention then
reads a cold copy. :class:`FerroattnCache` preallocates each layer once (float32, float16,
bfloat16 or int8, quantized on append), appends in place, keeps sliding-window layers in a ring
buffer, and lets ferroattn's attention function read that storage where it lies: int8 and
float16 converted in registers, no dequantized or concatenated copy per step.

How a layer hands its keys to the attention function: ``update`` returns what the model's
attention implementation can read. For ``"ferroattn"`` (see :func:`reads_in_place`) those are
stand-ins of the right shape (no memory of their own) tagged with the layer; the attention
function finds the layer on them and reads its storage (:meth:`FerroattnLayer.attend`). For any
other implementation they are real tensors in position order: views of the storage where it is
float of the model's dtype without a ring, copies otherwise (int8 dequantized).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .._dispatch import from_numpy, to_numpy
from ..kv_cache import KVCache
from .hf_mask import NativeMask, sequences

__all__ = ["FerroattnCache", "FerroattnLayer", "reads_in_place"]

_STORAGE = ("float32", "float16", "bfloat16", "int8")
# attn_implementation names whose attention function reads this cache's storage (register()).
_IN_PLACE: set[str] = set()
# The tag update() puts on its stand-in keys.
_TAG = "_ferroattn_layer"

Seqs = list[tuple[int, int, int, int, int]]


def reads_in_place(name: str) -> None:
    """Let the attention implementation ``name`` read the layers' storage directly."""
    _IN_PLACE.add(name)


def layer_of(key: Any) -> FerroattnLayer | None:
    """The layer whose stand-in ``key`` is (None for real tensors)."""
    return getattr(key, _TAG, None)


def _storage_name(dtype: Any) -> str:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in _STORAGE:
        raise TypeError(f"dtype must be one of {', '.join(_STORAGE)}, got {dtype!r}")
    return name


def _layer_types(config: Any) -> list[tuple[str, int | None]]:
    """Per decoder layer: its type and sliding window, as ``DynamicCache`` reads them."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    unknown = sorted({t for t in types} - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(
            f"FerroattnCache holds full and sliding-window attention layers; this model also "
            f"has {unknown} (use the model's default cache)"
        )
    return [(t, window if t == "sliding_attention" else None) for t in types]


class FerroattnLayer(CacheLayerMixin):
    """One attention layer's keys and values in a :class:`ferroattn.KVCache` (allocated at the
    first update, when the batch, heads and head sizes are known).

    A sliding-window layer shorter than ``max_cache_len`` is a ring of ``sliding_window``
    slots; a decode step's query sees exactly the tokens the ring holds, so attention reads
    them in slot order (the sum over keys does not depend on their order: rotary positions
    are already in them).
    """

    is_compileable = False

    def __init__(self, owner: FerroattnCache, max_cache_len: int, sliding_window: int | None):
        super().__init__()
        self._owner = owner
        self.max_cache_len = max_cache_len
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._ring = (
            sliding_window
            if sliding_window is not None and sliding_window < max_cache_len
            else None
        )
        self._kv: KVCache | None = None
        self._length = 0

    def __repr__(self) -> str:
        return f"FerroattnLayer(length={self._length}, ring={self._ring}, kv={self._kv!r})"

    # ---------------------------------------------------------------- storage

    def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
        batch, heads, _, head_dim = key_states.shape
        owner = self._owner
        if batch > owner.max_batch_size:
            raise ValueError(
                f"FerroattnCache(max_batch_size={owner.max_batch_size}) got a batch of {batch} "
                "sequences (beams and returned sequences count)"
            )
        if key_states.device.type != "cpu":
            raise ValueError(
                f"FerroattnCache keeps its storage in CPU memory; the model runs on "
                f"{key_states.device} (use transformers' StaticCache there)"
            )
        self._kv = KVCache(
            batch,
            heads,
            head_dim,
            capacity=None if self._ring else self.max_cache_len,
            dtype=owner.dtype,
            value_dim=value_states.shape[-1],
            window=self._ring,
        )
        self.batch_size = batch
        self.device = key_states.device
        self._dtype = key_states.dtype
        # The stand-ins update() hands to ferroattn's attention function: zero-stride views.
        self._stub = torch.zeros((), dtype=key_states.dtype)
        self.is_initialized = True

    @property
    def ring(self) -> int | None:
        """Slots of the ring buffer of a sliding-window layer (None: no ring)."""
        return self._ring

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """A ring cannot give back what it overwrote."""
        return self._ring is None

    @property
    def nbytes(self) -> int:
        """Bytes of storage (0 before the first update)."""
        return 0 if self._kv is None else self._kv.nbytes

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        """Store the new tokens; return the keys and values the attention call reads."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._kv is not None
        n, past = key_states.shape[-2], self._length
        if self._ring is None and past + n > self.max_cache_len:
            raise ValueError(
                f"FerroattnCache(max_cache_len={self.max_cache_len}) is full: {past} tokens "
                f"stored, {n} more given"
            )
        if self._ring is not None and n > 1:
            # The ring may not hold the whole chunk: its queries read the window before it
            # (copied, in position order) and the new tokens themselves.
            old = self._ordered(past - self._ring + 1, past) if past else None
            self._store(key_states, value_states)
            if old is None:
                return key_states, value_states
            return (
                torch.cat((old[0], key_states.to(old[0].dtype)), dim=-2),
                torch.cat((old[1], value_states.to(old[1].dtype)), dim=-2),
            )
        self._store(key_states, value_states)
        if self._owner.reads_in_place():
            return self._stand_ins(key_states, value_states)
        return self._ordered(self._first_seen(), self._length)

    def _store(self, key_states: Any, value_states: Any) -> None:
        assert self._kv is not None
        self._kv.append(key_states.detach(), value_states.detach())
        self._length += key_states.shape[-2]

    def _first_seen(self) -> int:
        """The first position the last token's window reaches (0 without a ring)."""
        return 0 if self._ring is None else max(0, self._length - self._ring)

    def _ordered(self, start: int, stop: int) -> tuple[Any, Any]:
        """Keys and values of positions ``start:stop`` as tensors of the model's dtype."""
        assert self._kv is not None
        k, v = self._kv.span(max(0, start), stop)
        return from_numpy(k).to(self._dtype), from_numpy(v).to(self._dtype)

    def _stand_ins(self, key_states: Any, value_states: Any) -> tuple[Any, Any]:
        n = self._length - self._first_seen()
        k = self._stub.expand(*key_states.shape[:2], n, key_states.shape[3])
        v = self._stub.expand(*value_states.shape[:2], n, value_states.shape[3])
        setattr(k, _TAG, self)
        setattr(v, _TAG, self)
        return k, v

    def ordered_keys(self) -> tuple[Any, Any]:
        """What :meth:`update` hands other implementations: keys and values from the first
        position the mask covers (:meth:`get_mask_sizes`) to the last, in order."""
        return self._ordered(self._first_seen(), self._length)

    # -------------------------------------------------------------- attention

    def attend(
        self,
        query: Any,
        mask: Any,
        *,
        scale: float | None,
        softcap: float | None,
        sinks: Any,
        is_causal: bool,
    ) -> Any | None:
        """Attention of ``query (B, H, Nq, D)`` over the storage as it lies; ``(B, Nq, H, Dv)``
        in the query's dtype. None when the storage cannot be read in place for this call (a
        dense mask, or a ring whose valid tokens wrap around): then the caller reads
        :meth:`ordered_keys`."""
        kv = self._kv
        assert kv is not None
        if mask is None:
            causal, window, ranges = is_causal, self.sliding_window, None
        elif isinstance(mask, NativeMask):
            causal, window, ranges = mask.causal, mask.window, mask.ranges
        else:
            return None
        b, h, nq, _ = query.shape
        length = self._length
        seqs: Seqs | None
        if self._ring is None:
            seqs = sequences(
                ranges, b, q_first=length - nq, nq=nq, k_first=0, nk=length, causal=causal
            )
        elif nq == 1 and causal and window == self._ring:
            seqs = self._ring_sequences(ranges)
            causal, window = False, None  # the slots hold exactly what the query sees
        else:
            seqs = None
        if seqs is None:
            return None
        out = torch.empty((b, nq, h, kv.value_dim), dtype=query.dtype)
        kv.attend_slots(
            to_numpy(query),
            seqs,
            causal=causal,
            window=window,
            scale=scale,
            softcap=softcap,
            sinks=None if sinks is None else to_numpy(sinks),
            out=to_numpy(out).transpose(0, 2, 1, 3),
        )
        return out

    def _ring_sequences(self, ranges: list[tuple[int, int]] | None) -> Seqs | None:
        """The slots a decode step's query sees, one range per sequence (None: one wraps)."""
        kv = self._kv
        ring = self._ring
        assert kv is not None and ring is not None
        length = self._length
        seqs = []
        for b in range(kv.batch):
            lo, hi = (0, length) if ranges is None else ranges[b]
            lo = max(lo, length - ring, 0)
            if hi < length or lo >= hi:
                continue  # a padding query, or no valid key: a row of zeros
            if length <= ring:
                seqs.append((b, 0, 1, lo, hi - lo))  # nothing overwritten: slot = position
            elif lo == length - ring:
                seqs.append((b, 0, 1, 0, ring))  # the whole ring
            else:
                first, last = kv.slot(lo), kv.slot(hi - 1)
                if first > last:
                    return None
                seqs.append((b, 0, 1, first, last + 1 - first))
        return seqs

    # ------------------------------------------------------------------ sizes

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the keys :meth:`update` returns for ``query_length``
        new tokens (as transformers' dynamic layers)."""
        if self._ring is None:
            return self._length + query_length, 0
        offset = max(self._length - self._ring + 1, 0)
        return self._length - offset + query_length, offset

    def get_seq_length(self) -> int:
        return self._length

    def get_max_length(self) -> int:
        return self.max_cache_len if self._ring is None else self._ring

    # ---------------------------------------------------------------- editing

    def reset(self) -> None:
        if self._kv is not None:
            self._kv.reset()
        self._length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative
        count; assisted generation rolls back rejected draft tokens this way)."""
        if tokens_to_remove > 0:
            raise ValueError(
                "FerroattnCache.crop takes a negative number of tokens to remove, got "
                f"{tokens_to_remove}"
            )
        n = -tokens_to_remove
        if n == 0 or self._kv is None:
            return
        try:
            self._kv.rollback(n)
        except ValueError as e:
            raise ValueError(
                f"FerroattnCache cannot crop {n} tokens of a sliding-window layer whose "
                "ring has overwritten what the window would need again"
            ) from e
        self._length -= n

    def reorder_cache(self, beam_idx: Any) -> None:
        """Beam search: keep the beams ``beam_idx`` names, in that order."""
        if self._kv is not None and self._length:
            self._kv.reorder(np.asarray(beam_idx.cpu(), dtype=np.int64))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ValueError(
            "FerroattnCache has a fixed batch; expand the inputs before the first forward"
        )

    def batch_select_indices(self, indices: Any) -> None:
        raise ValueError("FerroattnCache has a fixed batch; it cannot keep only some sequences")

    def offload(self) -> None:
        """Nothing to do: the storage lives in CPU memory already."""

    def prefetch(self) -> None:
        """Nothing to do: the storage lives in CPU memory already."""


class FerroattnCache(Cache):
    """A transformers ``Cache`` on ferroattn's KV storage, for ``model.generate`` on the CPU.

    Args:
        config: the model's config (``model.config``): its decoder's layer types and sliding
            window decide which layers are ring buffers.
        max_cache_len: tokens each full-attention layer holds (prompt plus new tokens);
            appending past it raises ``ValueError``. Sliding-window layers hold
            ``min(sliding_window, max_cache_len)``.
        max_batch_size: the most sequences a generation may run at once (beams count);
            storage is allocated at the first forward, for the batch it has.
        dtype: storage type: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"int8"``
            (symmetric, one float32 scale per token and head, quantized on append; see
            :class:`ferroattn.KVCache`). A ``torch.dtype`` of those names works too.
        device: ``"cpu"`` (the only device: the storage is NumPy memory the Rust kernels read).

    With ``attn_implementation="ferroattn"`` (:func:`ferroattn.integrations.transformers.register`)
    attention reads the storage in place. Another implementation still works: each layer then
    hands out tensors in position order, views of the storage where it is float of the model's
    dtype (and no ring), copies otherwise (int8 dequantized, a ring reordered).

    Prefill of a sliding-window layer reads the new keys as the model computed them (the ring
    may not hold the whole prompt), decode steps read the stored ones: with int8 storage
    the prompt's own attention is exact, as in transformers' ``QuantizedCache``.

    Example:
        >>> from ferroattn.integrations import transformers as fa_hf  # doctest: +SKIP
        >>> fa_hf.register()
        >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ferroattn")
        >>> cache = fa_hf.FerroattnCache(model.config, max_cache_len=4096, dtype="int8")
        >>> model.generate(**inputs, max_new_tokens=64, past_key_values=cache)
    """

    def __init__(
        self,
        config: Any,
        max_cache_len: int,
        *,
        max_batch_size: int = 1,
        dtype: Any = "float32",
        device: Any = "cpu",
    ) -> None:
        for name, value in (("max_cache_len", max_cache_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"FerroattnCache keeps its storage in CPU memory, got device={device!r} "
                "(use transformers' StaticCache on other devices)"
            )
        self.dtype = _storage_name(dtype)
        self.max_cache_len = int(max_cache_len)
        self.max_batch_size = int(max_batch_size)
        self._config = config.get_text_config(decoder=True)
        self._own = [
            FerroattnLayer(self, self.max_cache_len, window)
            for _, window in _layer_types(self._config)
        ]
        layers: list[Any] = list(self._own)
        super().__init__(layers=layers)

    def reads_in_place(self) -> bool:
        """Whether the model's attention implementation reads the storage directly (asked at
        every update: ``model.set_attn_implementation`` may change it between calls)."""
        return getattr(self._config, "_attn_implementation", None) in _IN_PLACE

    @property
    def nbytes(self) -> int:
        """Bytes of storage of all layers (keys, values, int8 scales; 0 before the first
        forward)."""
        return sum(layer.nbytes for layer in self._own)

    def __repr__(self) -> str:
        rings = sorted({layer.ring for layer in self._own if layer.ring})
        return (
            f"FerroattnCache(layers={len(self.layers)}, max_cache_len={self.max_cache_len}, "
            f"dtype={self.dtype!r}, rings={rings}, length={self.get_seq_length()})"
        )
