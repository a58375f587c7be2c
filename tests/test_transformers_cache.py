"""FerroattnCache: ``generate()`` on ferroattn's own KV storage, tiny random models, no downloads.

fp32 storage gives the greedy tokens of ``"eager"`` with transformers' ``DynamicCache`` (GQA,
sliding windows as ring buffers, softcapping, a left-padded batch of 3, beam search, assisted
generation); fp16 / bf16 / int8 storage keep the logits within a stated bound. Masks reach the
kernels as options, never as ``(B, 1, Nq, Nk)`` arrays. Skipped without torch/transformers,
unless FERROATTN_REQUIRE_TORCH=1 (CI).
"""

from __future__ import annotations

import importlib
import inspect
import os

import pytest


def _require(name: str):
    if os.environ.get("FERROATTN_REQUIRE_TORCH") == "1":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"FERROATTN_REQUIRE_TORCH=1 but {name} cannot be imported: {e}", False)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install ferroattn[hf])")


torch = _require("torch")
transformers = _require("transformers")

from ferroattn.integrations import hf_mask  # noqa: E402
from ferroattn.integrations import transformers as fa_hf  # noqa: E402
from ferroattn.integrations.hf_cache import layer_of  # noqa: E402

fa_hf.register()

VOCAB = 97
# Largest |logit difference| / max |logit| against fp32 eager, per storage type (measured:
# ~5e-7, 3e-4, 2.3e-3, 5.2e-3 on these models).
LOGIT_TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2, "int8": 3e-2}


@pytest.fixture
def seen(monkeypatch):
    """What ferroattn's attention function was given: (Nq, mask kind, read in place)."""
    calls = []
    original = fa_hf.attention_forward

    def recorded(module, query, key, value, attention_mask, *args, **kwargs):
        kind = type(attention_mask).__name__ if attention_mask is not None else None
        calls.append((query.shape[2], kind, layer_of(key) is not None))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, fa_hf.NAME, recorded)
    return calls


def _tiny(cls, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    common.update(extra)
    return cls(**common)


MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(
        _tiny(transformers.LlamaConfig, num_key_value_heads=2)
    ),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        _tiny(transformers.Qwen2Config, num_key_value_heads=2)
    ),
    "mistral": lambda: transformers.MistralForCausalLM(
        _tiny(transformers.MistralConfig, num_key_value_heads=1, sliding_window=4)
    ),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(
        _tiny(
            transformers.Gemma2Config,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
        )
    ),
}


def _model(name, seed=1):
    torch.manual_seed(seed)
    return MODELS[name]().eval()


def _left_padded(batch=3, n=10, seed=0, pads=(0, 3, 6)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate(pads[:batch]):
        mask[b, :pad] = 0
    return ids, mask


def _cache_kw(model) -> str:
    """The name ``forward``/``generate`` give the cache (``cache`` in recent transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _generate(model, impl, ids, mask, cache=None, **options):
    model.set_attn_implementation(impl)
    extra = {} if cache is None else {_cache_kw(model): cache}
    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=options.pop("new", 10),
            do_sample=False,
            pad_token_id=0,
            **extra,
            **options,
        )


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_storage_gives_eager_greedy_tokens(name, seen):
    model = _model(name)
    ids, mask = _left_padded()
    want = _generate(model, "eager", ids, mask)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32, max_batch_size=3)
    got = _generate(model, fa_hf.NAME, ids, mask, cache)
    assert torch.equal(got, want), (got, want)
    assert cache.get_seq_length() == ids.shape[1] + 9  # the last token is never fed back
    # Prefill and decode went through ferroattn, masks as options only; decode steps read the
    # storage in place (a window layer's prefill reads the new keys themselves).
    assert {s[0] for s in seen} == {1, ids.shape[1]}
    assert {s[1] for s in seen} == {"NativeMask"}
    assert all(s[2] for s in seen if s[0] == 1)


def test_ring_with_padding_inside_the_window(seen):
    # Window 4 over 9-token prompts padded by 6 and 7: for the first steps the padding still lies
    # in the ring, and the valid slots of one sequence wrap around its end (read in order then).
    model = _model("mistral")
    ids, mask = _left_padded(n=9, pads=(0, 6, 7))
    want = _generate(model, "eager", ids, mask)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32, max_batch_size=3, dtype="int8")
    assert torch.equal(_generate(model, fa_hf.NAME, ids, mask, cache), want)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_other_attention_implementations_read_its_tensors(name):
    model = _model(name)
    ids, mask = _left_padded()
    want = _generate(model, "eager", ids, mask)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32, max_batch_size=3)
    assert torch.equal(_generate(model, "sdpa", ids, mask, cache), want)


def _teacher_forced_logits(model, cache, ids, mask, prefill):
    """Logits of every position: a prefill of ``prefill`` tokens, then one token per step."""
    kw = _cache_kw(model)
    with torch.no_grad():
        parts = [model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], **{kw: cache})]
        for i in range(prefill, ids.shape[1]):
            step = model(
                input_ids=ids[:, i : i + 1], attention_mask=mask[:, : i + 1], **{kw: cache}
            )
            parts.append(step)
    return torch.cat([p.logits for p in parts], dim=1)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_storage_types_keep_logits_close(name):
    model = _model(name)
    ids, mask = _left_padded(n=20)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(fa_hf.NAME)
    valid = mask.bool()
    for dtype, tol in LOGIT_TOL.items():
        cache = fa_hf.FerroattnCache(model.config, 24, max_batch_size=3, dtype=dtype)
        got = _teacher_forced_logits(model, cache, ids, mask, prefill=10)
        err = (got - want)[valid].abs().max() / want[valid].abs().max()
        assert err < tol, (name, dtype, float(err))


def test_nbytes_follow_storage_type_and_rings():
    llama, mistral = _model("llama"), _model("mistral")  # 2 layers, 2 (llama) / 1 KV heads, D=16
    ids, mask = _left_padded()
    for model, heads, slots in ((llama, 2, 32), (mistral, 1, 4)):
        per_token = {"float32": 4 * 16, "float16": 2 * 16, "bfloat16": 2 * 16, "int8": 16 + 4}
        for dtype, nbytes in per_token.items():
            cache = fa_hf.FerroattnCache(
                model.config, max_cache_len=32, max_batch_size=3, dtype=dtype
            )
            assert cache.nbytes == 0  # allocated at the first forward
            _generate(model, fa_hf.NAME, ids, mask, cache, new=2)
            assert cache.nbytes == 2 * 2 * 3 * heads * slots * nbytes, (dtype, cache)


def test_beam_search_reorders_the_storage():
    model = _model("llama")
    ids, mask = _left_padded(batch=2)
    want = _generate(model, "eager", ids, mask, num_beams=3, num_return_sequences=2)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32, max_batch_size=6)
    got = _generate(model, fa_hf.NAME, ids, mask, cache, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, want)


def test_beam_search_over_rings():
    model = _model("mistral")
    ids, mask = _left_padded(batch=2)
    want = _generate(model, "eager", ids, mask, num_beams=3)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32, max_batch_size=6)
    assert torch.equal(_generate(model, fa_hf.NAME, ids, mask, cache, num_beams=3), want)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_chunk_after_generation_reads_the_window_before_it(dtype):
    # A second generate() with 3 more prompt tokens on the same cache: the chunk's queries see
    # the ring's window before them (a copy) and the chunk itself.
    model = _model("mistral")
    ids, mask = _left_padded(batch=2)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=40, max_batch_size=2, dtype=dtype)
    first = _generate(model, fa_hf.NAME, ids, mask, cache, new=4)
    more = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(9))
    ids2 = torch.cat([first, more], 1)
    mask2 = torch.cat([mask, torch.ones(2, 7, dtype=mask.dtype)], 1)
    want = _generate(model, "eager", ids2, mask2, new=6)
    assert torch.equal(_generate(model, fa_hf.NAME, ids2, mask2, cache, new=6), want)


def test_assisted_generation_crops_full_layers_and_refuses_rings():
    model, assistant = _model("llama"), _model("llama", seed=5)
    assistant.set_attn_implementation(fa_hf.NAME)
    ids = _left_padded(batch=1)[0]
    mask = torch.ones_like(ids)
    want = _generate(model, "eager", ids, mask)
    cache = fa_hf.FerroattnCache(model.config, max_cache_len=32)
    assert torch.equal(
        _generate(model, fa_hf.NAME, ids, mask, cache, assistant_model=assistant), want
    )
    mistral = _model("mistral")
    ring = fa_hf.FerroattnCache(mistral.config, max_cache_len=32)
    assert not ring.is_croppable
    with pytest.raises(ValueError, match="crop"):
        _generate(mistral, fa_hf.NAME, ids, mask, ring, assistant_model=_model("mistral", 5))


def test_refusals_name_the_limit():
    model = _model("llama")
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match="max_batch_size=2"):
        _generate(
            model, fa_hf.NAME, ids, mask, fa_hf.FerroattnCache(model.config, 32, max_batch_size=2)
        )
    full = fa_hf.FerroattnCache(model.config, max_cache_len=12, max_batch_size=3)
    with pytest.raises(ValueError, match="max_cache_len=12"):
        _generate(model, fa_hf.NAME, ids, mask, full, new=5)
    with pytest.raises(TypeError, match="dtype"):
        fa_hf.FerroattnCache(model.config, 32, dtype="float64")
    with pytest.raises(ValueError, match="CPU"):
        fa_hf.FerroattnCache(model.config, 32, device="meta")
    with pytest.raises(ValueError, match="max_cache_len"):
        fa_hf.FerroattnCache(model.config, 0)


def _mask_of(**kw):
    args = dict(batch_size=2, q_length=5, kv_length=8, q_offset=3, kv_offset=0)
    args.update(kw)
    return hf_mask.build_mask(**args)


def test_masks_that_ferroattn_says_natively():
    from transformers.masking_utils import (
        bidirectional_mask_function,
        chunked_causal_mask_function,
        sliding_window_causal_mask_function,
    )

    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]).bool()
    causal = _mask_of(attention_mask=left)
    assert causal == hf_mask.NativeMask(True, None, 3, 0, [(2, 8), (0, 8)])
    window = _mask_of(mask_function=sliding_window_causal_mask_function(4), local_size=4)
    assert window == hf_mask.NativeMask(True, 4, 3, 0, None)
    both = _mask_of(mask_function=bidirectional_mask_function, attention_mask=left.flip(1))
    assert both == hf_mask.NativeMask(False, None, 3, 0, [(0, 6), (0, 8)])
    # What options cannot say stays a dense boolean mask, as SDPA's.
    holes = torch.tensor([[1, 0, 1, 1, 1, 1, 1, 1], [1] * 8]).bool()
    assert _mask_of(attention_mask=holes).shape == (2, 1, 5, 8)
    chunked = chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    assert _mask_of(mask_function=chunked).shape == (2, 1, 5, 8)
    other_window = _mask_of(mask_function=sliding_window_causal_mask_function(3), local_size=4)
    assert isinstance(other_window, torch.Tensor)


def test_sequences_cut_padding_queries_and_keys():
    # Queries at positions 3..7 over keys 0..7; sequence 0 starts at 2, sequence 1 ends at 5.
    seqs = hf_mask.sequences([(2, 8), (0, 5)], 2, q_first=3, nq=5, k_first=0, nk=8, causal=True)
    assert seqs == [(0, 0, 5, 2, 6), (1, 0, 2, 0, 5)]
    # A sequence that starts after the first query: its earlier queries are padding.
    assert hf_mask.sequences([(5, 8)], 1, q_first=3, nq=5, k_first=0, nk=8, causal=True) == [
        (0, 2, 3, 5, 3)
    ]
    assert hf_mask.sequences([(2, 6)], 1, q_first=0, nq=4, k_first=0, nk=8, causal=False) == [
        (0, 0, 4, 2, 4)
    ]
