"""Hugging Face transformers: ``attn_implementation="ferroattn"``.

Example:
    >>> import ferroattn.integrations.transformers as fa_hf          # doctest: +SKIP
    >>> fa_hf.register()
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ferroattn")
    >>> model.generate(**inputs, max_new_tokens=20)

With :class:`FerroattnCache` as the ``past_key_values`` of ``generate()``, each layer's keys
and values live in ferroattn's preallocated storage (float32, float16, bfloat16 or int8,
sliding-window layers as ring buffers) and the attention reads them in place:

    >>> cache = fa_hf.FerroattnCache(model.config, max_cache_len=4096)  # doctest: +SKIP
    >>> model.generate(**inputs, max_new_tokens=20, past_key_values=cache)

:func:`register` adds the attention function to transformers' ``AttentionInterface`` and, under
the same name, a mask builder to its ``AttentionMaskInterface``. Causal, bidirectional and
sliding-window masks whose padding leaves each sequence one run of tokens (left or right
padding) reach the kernels as options (:mod:`.hf_mask`): no ``Nq x Nk`` mask is built. Other
masks (chunked layers, packed sequences, overlays, padding with holes) come as SDPA's dense
boolean masks. Queries of padding tokens get zeros (no valid token ever attends to them).
Softcapping (Gemma 2), GQA (Llama, Mistral, Qwen), attention sinks (gpt-oss ``s_aux``) and the
KV cache of ``generate()`` all pass through. CPU tensors run on the Rust kernels without a
copy; tensors on a GPU use torch (see :mod:`ferroattn.torch`). Inference only: no gradients
flow through the attention (train with ``"sdpa"``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import functional
from .._cache_storage import attend_sequences
from .._dispatch import to_numpy
from .hf_cache import FerroattnCache, layer_of, reads_in_place
from .hf_mask import NativeMask, build_mask, sequences

__all__ = ["NAME", "FerroattnCache", "attention_forward", "register"]

# Key/value dtypes the kernels read as they are (others are computed in float32).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

NAME = "ferroattn"


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature (as ``sdpa_attention_forward``).

    ``query (B, H, Nq, D)``, ``key``/``value (B, Hkv, Nk, D)`` (GQA is read in place, no
    ``repeat_kv``); returns ``(output (B, Nq, H, Dv), None)``.
    """
    if dropout and module is not None and getattr(module, "training", False):
        raise ValueError(
            "ferroattn has no attention dropout; call model.eval() or use "
            "attn_implementation='sdpa'"
        )
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        warnings.warn(
            "ferroattn computes no gradients: the attention output is detached "
            "(use torch.no_grad() for inference, or attn_implementation='sdpa' to train)",
            stacklevel=2,
        )
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
    layer = layer_of(key)
    if layer is not None:  # a FerroattnCache layer: read its storage where it lies
        causal_default = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = layer.attend(
            query,
            attention_mask,
            scale=scaling,
            softcap=softcap,
            sinks=sinks,
            is_causal=causal_default,
        )
        if out is not None:
            return out, None
        key, value = layer.ordered_keys()
    if isinstance(attention_mask, NativeMask):
        return _attend_native(query, key, value, attention_mask, scaling, softcap, sinks), None
    mask = bias = None
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:
        causal: Any = False  # the mask holds causality, windows and padding
        attention_mask = attention_mask[..., :kv_len]
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    else:
        # As SDPA: is_causal is top-left (a prefill of an empty static cache has Nk > Nq), and a
        # single query sees every key.
        is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = "top_left" if (is_causal and q_len > 1) else False
    b, h, _, _ = query.shape
    # Write straight into the (B, Nq, H, Dv) layout transformers wants: no transpose copy.
    out = torch.empty(
        (b, q_len, h, value.shape[3]), dtype=query.dtype, device=query.device
    ).transpose(1, 2)
    functional.attention(
        query,
        key,
        value,
        causal=causal,
        scale=scaling,
        softcap=softcap,
        mask=mask,
        bias=bias,
        sinks=sinks,
        out=out,
    )
    return out.transpose(1, 2), None


def _attend_native(
    query: Any,
    key: Any,
    value: Any,
    mask: NativeMask,
    scaling: float | None,
    softcap: float | None,
    sinks: Any,
) -> Any:
    """Attention over key/value tensors under a :class:`NativeMask`: each sequence's valid
    keys as one range, causal alignment and window as options; ``(B, Nq, H, Dv)``."""
    b, h, nq, _ = query.shape
    dtype = query.dtype
    if key.dtype not in _KERNEL_DTYPES or key.dtype != query.dtype:
        query, key, value = query.float(), key.float(), value.float()
    seqs = sequences(
        mask.ranges,
        b,
        q_first=mask.q_offset,
        nq=nq,
        k_first=mask.kv_offset,
        nk=key.shape[2],
        causal=mask.causal,
    )
    out = torch.empty((b, nq, h, value.shape[3]), dtype=query.dtype)
    attend_sequences(
        to_numpy(query),
        to_numpy(key),
        to_numpy(value),
        seqs,
        causal=mask.causal,
        window=mask.window,
        scale=scaling,
        softcap=softcap,
        sinks=None if sinks is None else to_numpy(sinks),
        out=to_numpy(out).transpose(0, 2, 1, 3),
    )
    return out if out.dtype == dtype else out.to(dtype)


def register(name: str = NAME) -> None:
    """Make ``name`` (default ``"ferroattn"``) an ``attn_implementation`` of transformers.

    Call it once before loading a model; then ``from_pretrained(...,
    attn_implementation="ferroattn")`` or ``model.set_attn_implementation("ferroattn")``.
    A :class:`FerroattnCache` is then read in place by models that use ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, build_mask)
    reads_in_place(name)
