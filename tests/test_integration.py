"""spectral_kv inside transformers' generate, on tiny random models of several architectures."""

import pytest
import torch
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import spectral_kv as sk
from spectral_kv.integrations.transformers import COUNTERS

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0)
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False}),
}
LOSSLESS = sk.SpectralConfig(block_size=16, k_rank_keys=16, k_rank_values=16, hot_buffer_size=4, sink_tokens=2,
                             compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False)
LOSSY = sk.SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, verbose=False)


def tiny(arch, **extra):
    cfg_cls, model_cls, kw = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**{**COMMON, **kw, **extra})).eval()


def greedy(model, ids, n=40, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("attention", ["spectral", "reconstruct"])
def test_lossless_generate_matches_dynamic_cache(arch, attention):
    model = tiny(arch)
    ids = torch.randint(1, 96, (1, 75), generator=torch.Generator().manual_seed(1))
    expected = greedy(model, ids, past_key_values=DynamicCache())
    before = dict(COUNTERS)
    patch = sk.patch_unsloth_attention(model, config=LOSSLESS.replace(attention=attention))
    try:
        got = greedy(model, ids)
    finally:
        patch.unpatch()
    assert torch.equal(got, expected)
    cache = patch.last_cache
    # 75 + 40 tokens: blocks were compressed at prefill and during decode
    assert all(sum(layer.tiers.n_cold) >= 6 for layer in cache.spectral_layers)
    assert cache.get_seq_length() == 75 + 39  # the last token is sampled, never fed back
    # every forward of every layer went through our attention and our mask function
    assert COUNTERS["spectral_calls"] - before["spectral_calls"] == 2 * 40 == cache.attention_calls()
    assert COUNTERS["mask_calls"] - before["mask_calls"] == 40


def test_native_spectral_cache_argument_and_unpatch_restores():
    model = tiny("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    expected = greedy(model, ids, past_key_values=DynamicCache())
    model.set_attn_implementation("spectral_kv")
    cache = sk.SpectralCache(LOSSLESS, model.config)
    assert torch.equal(greedy(model, ids, past_key_values=cache), expected)
    assert cache.get_seq_length() == 40 + 39 and cache.attention_calls() == 80
    model.set_attn_implementation("sdpa")
    patch = sk.patch_unsloth_attention(model, config=LOSSY)
    assert model.config._attn_implementation == "spectral_kv" and "generate" in model.__dict__
    patch.unpatch()
    assert model.config._attn_implementation == "sdpa" and "generate" not in model.__dict__
    assert torch.equal(greedy(model, ids, past_key_values=DynamicCache()), expected)


def test_other_attention_gets_materialized_cache():
    """A SpectralCache under sdpa attention still works (cold blocks decompressed for it)."""
    model = tiny("qwen3")
    ids = torch.randint(1, 96, (1, 50), generator=torch.Generator().manual_seed(3))
    expected = greedy(model, ids, past_key_values=DynamicCache())
    cache = sk.SpectralCache(LOSSLESS, model.config)
    assert torch.equal(greedy(model, ids, past_key_values=cache), expected)
    assert sum(cache.spectral_layers[0].tiers.n_cold) > 0 and cache.attention_calls() == 0


@pytest.mark.parametrize("config", [LOSSY, LOSSY.replace(attention="reconstruct")], ids=["spectral", "reconstruct"])
def test_left_padded_batch_equals_each_sequence_alone(config):
    model = tiny("llama")
    patch = sk.patch_unsloth_attention(model, config=config)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(1, 96, (1, n), generator=g) for n in (70, 37, 52)]
    alone = [greedy(model, s, n=30, pad_token_id=0)[0, s.shape[1]:] for s in seqs]
    width = max(s.shape[1] for s in seqs)
    batch = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, s in enumerate(seqs):
        batch[i, width - s.shape[1]:] = s[0]
        mask[i, width - s.shape[1]:] = 1
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    patch.unpatch()
    for i in range(len(seqs)):
        assert torch.equal(out[i, width:], alone[i]), i
    layer = patch.last_cache.spectral_layers[0]
    # padding never entered the tiers: each row holds exactly its own real tokens
    assert layer.tiers.tokens() == [s.shape[1] + 29 for s in seqs]


def test_sliding_window_layers_stay_exact_with_notice(capsys):
    model = tiny("mistral", sliding_window=24)
    ids = torch.randint(1, 96, (1, 60), generator=torch.Generator().manual_seed(5))
    expected = greedy(model, ids, past_key_values=DynamicCache(config=model.config))
    model.set_attn_implementation("spectral_kv")
    cache = sk.SpectralCache(LOSSY.replace(verbose=True), model.config)
    assert "2/2 layers are sliding-window" in capsys.readouterr().out
    assert torch.equal(greedy(model, ids, past_key_values=cache), expected)
    assert cache.spectral_layers == [] and COUNTERS["exact_calls"] > 0


def test_attention_bypass_is_an_error_not_silent_loss():
    model = tiny("llama")
    cache = sk.SpectralCache(LOSSY)  # no model config: cannot know the attention in use
    with pytest.raises(RuntimeError, match="never consumed"):
        greedy(model, torch.randint(1, 96, (1, 10)), past_key_values=cache)


def test_beam_search_and_num_return_sequences_run_lossless():
    model = tiny("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(6))
    expected = greedy(model, ids, n=12, num_beams=3, num_return_sequences=2, past_key_values=DynamicCache())
    patch = sk.patch_unsloth_attention(model, config=LOSSLESS)
    got = greedy(model, ids, n=12, num_beams=3, num_return_sequences=2)
    patch.unpatch()
    assert torch.equal(got, expected)


def test_memory_report_counts_what_is_held():
    model = tiny("llama")
    patch = sk.patch_unsloth_attention(model, config=LOSSY)
    greedy(model, torch.randint(1, 96, (1, 90)), n=5)
    patch.unpatch()
    rep = patch.memory_report()
    held = sum(t.numel() * t.element_size() for layer in patch.last_cache.spectral_layers for t in layer.tiers.held_tensors())
    assert rep["total_bytes"] == held and rep["ratio"] > 1.5
    assert rep["dense_bytes"] == 2 * 94 * 2 * 16 * 4 * 2  # layers x tokens x heads x dim x fp32 x (K, V)


def test_nan_in_model_states_raises_clearly():
    model = tiny("llama")
    patch = sk.patch_unsloth_attention(model, config=LOSSY)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN/Inf"):
            greedy(model, torch.randint(1, 96, (1, 40)), n=2)
    patch.unpatch()
