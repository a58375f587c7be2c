"""ferroattn as a Hugging Face ``attn_implementation``: tiny random models built from configs.

Encoders with padded batches match ``"sdpa"`` on the valid positions; decoders produce the same
greedy tokens as ``"eager"`` (GQA, sliding windows, softcapping, left padding, the KV cache of
``generate()``). Skipped without torch/transformers, unless FERROATTN_REQUIRE_EXTRAS=1 (CI).
"""

from __future__ import annotations

import pytest
from optional import require, tiny_config

torch = require("torch")
transformers = require("transformers")

from ferroattn.integrations import transformers as fa_hf  # noqa: E402

fa_hf.register()


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of ferroattn's attention function (to show the model really used it)."""
    seen = []
    original = fa_hf.attention_forward

    def counted(*args, **kwargs):
        seen.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, fa_hf.NAME, counted)
    return seen


def _padded_ids(batch=3, n=11, vocab=97, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, n), generator=g)
    mask = torch.ones_like(ids)
    for b, pad in enumerate([0, 3, 6][:batch]):
        if pad:
            if left:
                mask[b, :pad] = 0
            else:
                mask[b, n - pad :] = 0
    return ids, mask


def test_register_is_an_attention_implementation():
    assert fa_hf.NAME in transformers.AttentionInterface()
    from transformers.masking_utils import AttentionMaskInterface

    assert fa_hf.NAME in AttentionMaskInterface()


def test_bert_padded_matches_sdpa(calls):
    cfg = tiny_config(transformers.BertConfig, type_vocab_size=2)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids, mask = _padded_ids()
    hidden = {}
    for impl in ("sdpa", fa_hf.NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            hidden[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls, "ferroattn was not called"
    valid = mask.bool()
    torch.testing.assert_close(
        hidden[fa_hf.NAME][valid], hidden["sdpa"][valid], rtol=1e-4, atol=1e-4
    )


def _same_greedy_tokens(model, calls, *, n=9, left_pad=True, new=8):
    ids, mask = _padded_ids(n=n, vocab=model.config.vocab_size, left=left_pad)
    tokens = {}
    for impl in ("eager", fa_hf.NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            tokens[impl] = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
    assert calls, "ferroattn was not called"
    # Prefill (Nq > 1) and decode steps (Nq == 1) both went through ferroattn.
    assert {s[2] for s in calls} >= {1, n}
    assert torch.equal(tokens[fa_hf.NAME], tokens["eager"]), (tokens, calls[:3])


def test_llama_gqa_generate_matches_eager(calls):
    cfg = tiny_config(transformers.LlamaConfig, num_key_value_heads=2)
    torch.manual_seed(1)
    _same_greedy_tokens(transformers.LlamaForCausalLM(cfg).eval(), calls)


def test_mistral_sliding_window_generate_matches_eager(calls):
    cfg = tiny_config(transformers.MistralConfig, num_key_value_heads=1, sliding_window=4)
    torch.manual_seed(2)
    _same_greedy_tokens(transformers.MistralForCausalLM(cfg).eval(), calls, n=10)


def test_gemma2_softcap_sliding_generate_matches_eager(calls):
    cfg = tiny_config(
        transformers.Gemma2Config,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
    )
    torch.manual_seed(3)
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    _same_greedy_tokens(model, calls, n=10)


def test_encoder_prefill_hidden_states_match_eager_for_decoder(calls):
    # A causal prefill with right padding: logits of valid positions agree with eager.
    cfg = tiny_config(transformers.LlamaConfig, num_key_value_heads=2)
    torch.manual_seed(4)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids, mask = _padded_ids()
    logits = {}
    for impl in ("eager", fa_hf.NAME):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[fa_hf.NAME][valid], logits["eager"][valid])
