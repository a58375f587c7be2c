"""Hugging Face transformers: ``attn_implementation="ferroattn"``.

Example:
    >>> import ferroattn.integrations.transformers as fa_hf          # doctest: +SKIP
    >>> fa_hf.register()
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="ferroattn")
    >>> model.generate(**inputs, max_new_tokens=20)

:func:`register` adds the attention function to transformers' ``AttentionInterface`` and, under
the same name, the mask builder to its ``AttentionMaskInterface``: ferroattn gets the same boolean
masks SDPA gets (padding, causal, sliding-window and chunked layers), or none where
``is_causal`` suffices. Softcapping (Gemma 2), GQA (Llama, Mistral, Qwen), attention sinks
(gpt-oss ``s_aux``) and the KV cache of ``generate()`` all pass through. CPU tensors run on the
Rust kernels without a copy; tensors on a GPU use torch (see :mod:`ferroattn.torch`).
Inference only: no gradients flow through the attention (train with ``"sdpa"``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .. import functional

__all__ = ["NAME", "attention_forward", "register"]

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
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux")
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


def register(name: str = NAME) -> None:
    """Make ``name`` (default ``"ferroattn"``) an ``attn_implementation`` of transformers.

    Call it once before loading a model; then ``from_pretrained(...,
    attn_implementation="ferroattn")`` or ``model.set_attn_implementation("ferroattn")``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
