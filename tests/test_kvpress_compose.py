"""kvpress with SpectralCache: its pipeline with and without presses, ``with press(model):
model.generate(...)``, and the composed eval methods (eviction first, then spectral compression
of what is kept). At lossless settings every answer equals the same press over DynamicCache,
with compressed blocks in play."""

import contextlib

import pytest
import torch
from conftest import method_or_skip
from test_integration import LOSSLESS
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv.eval.perplexity import run_segment
from spectral_kv.eval.tiny import tiny_hf_tokenizer, tiny_random_model

kvpress = pytest.importorskip("kvpress")

PRESSES = {
    "none": lambda: None,
    "streaming": lambda: kvpress.StreamingLLMPress(compression_ratio=0.5),
    "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=0.5, window_size=8),
    "knorm": lambda: kvpress.KnormPress(compression_ratio=0.5),
    "expected": lambda: kvpress.ExpectedAttentionPress(compression_ratio=0.5),
}
CONTEXT = "Spectral caches keep the newest tokens exact and old blocks compressed. " * 3  # 216 byte tokens


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_random_model()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 0
    return model


def _pipeline_answers(model, press, cache_factory):
    pipe = kvpress.KVPressTextGenerationPipeline(model=model, tokenizer=tiny_hf_tokenizer())
    cache = cache_factory()
    out = pipe(CONTEXT, questions=["What is kept?", "And what not?"], press=press, cache=cache, max_new_tokens=12)
    return out["answers"], cache


@pytest.mark.parametrize("name", list(PRESSES))
def test_pipeline_matches_dynamic_cache(tiny, name):
    tiny.set_attn_implementation("sdpa")
    expected, exact = _pipeline_answers(tiny, PRESSES[name](), DynamicCache)
    tiny.set_attn_implementation("spectral_kv")
    try:
        got, cache = _pipeline_answers(tiny, PRESSES[name](), lambda: sk.SpectralCache(LOSSLESS, tiny.config))
    finally:
        tiny.set_attn_implementation("sdpa")
    assert got == expected and all(got)
    tiers = cache.layers[0].tiers
    kept = 217 if name == "none" else 108  # BOS + 216 byte tokens; int(217 * 0.5)
    # two questions asked and each answer removed again (kvpress assigns a prefix of keys/values)
    assert cache.get_seq_length() == exact.get_seq_length() == kept
    assert sum(tiers.n_cold) >= 5  # what the press kept was then compressed


@pytest.mark.parametrize("name", ["streaming", "snapkv", "knorm", "expected"])
def test_press_context_around_generate(tiny, name):
    ids = torch.randint(1, 256, (1, 150), generator=torch.Generator().manual_seed(0))
    runs = []
    for impl, cache in (("sdpa", DynamicCache()), ("spectral_kv", sk.SpectralCache(LOSSLESS, tiny.config))):
        tiny.set_attn_implementation(impl)
        try:
            with PRESSES[name]()(tiny), torch.no_grad():
                runs.append(tiny.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                          do_sample=False, past_key_values=cache))
        finally:
            tiny.set_attn_implementation("sdpa")
    assert torch.equal(runs[0], runs[1])
    assert cache.get_seq_length() == 75 + 19 and sum(cache.layers[0].tiers.n_cold) >= 4


def test_without_hooks_the_prompt_is_compressed_at_once(tiny):
    tiny.set_attn_implementation("spectral_kv")
    try:
        cache = sk.SpectralCache(LOSSLESS, tiny.config)
        with torch.no_grad():
            tiny(torch.randint(1, 256, (1, 100)), past_key_values=cache)
        assert cache.layers[0].tiers.n_cold == [5]  # (100 - 2 sinks - 4 hot) // 16
        hooked = sk.SpectralCache(LOSSLESS, tiny.config)
        with PRESSES["knorm"]()(tiny), torch.no_grad():
            tiny(torch.randint(1, 256, (1, 100)), past_key_values=hooked)
        assert hooked.layers[0].tiers.n_cold == [0] and hooked.get_seq_length() == 50  # left to the next update
        hooked.freeze(8)  # right after the press-deferred prefill: settled first, then static
        assert hooked.layers[0].tiers.static and hooked.layers[0].tiers.n_cold == [2]  # (50 - 2 - 4) // 16
    finally:
        tiny.set_attn_implementation("sdpa")


@pytest.mark.parametrize("press", ["snapkv", "streaming", "knorm", "expected"])
def test_composed_method_equals_the_press_alone_at_lossless_settings(tiny, press):
    lossless = "spectral:preset=fast,compressor=exact_svd,k=16,v=16,bits=none,vbits=same,block=16,hot=4,sink=2"
    alone = method_or_skip(f"{press}:ratio=0.5")
    composed = method_or_skip(f"{press}:ratio=0.5+{lossless}")
    assert composed.evicts and composed.describe()["settings"]["parts"] == [f"{press}:ratio=0.5", lossless]
    ids = torch.randint(0, 256, (230,), generator=torch.Generator().manual_seed(1))
    a = run_segment(tiny, alone, ids[:200], ids[200:], chunk=8)
    composed.setup(tiny)
    try:
        b = run_segment(tiny, composed, ids[:200], ids[200:], chunk=8)
    finally:
        composed.teardown(tiny)
    assert torch.allclose(a.logits, b.logits, atol=1e-4), (a.logits - b.logits).abs().max()


def test_composed_bytes_are_the_product_of_both(tiny):
    press = method_or_skip("snapkv:ratio=0.5")
    spectral = method_or_skip("spectral:preset=balanced,block=32,hot=8,sink=2")
    composed = method_or_skip("snapkv:ratio=0.5+spectral:preset=balanced,block=32,hot=8,sink=2")
    ids = torch.randint(0, 256, (520,), generator=torch.Generator().manual_seed(2))
    ratios = {}
    for m in (press, spectral, composed):
        m.setup(tiny)
        try:
            ratios[m.spec] = run_segment(tiny, m, ids[:512], ids[512:], chunk=4).bytes_after_prefill["ratio_vs_fp16"]
        finally:
            m.teardown(tiny)
    assert ratios[press.spec] == pytest.approx(2.0, rel=0.02)
    assert ratios[composed.spec] > 1.5 * ratios[press.spec]
    assert ratios[composed.spec] > ratios[spectral.spec]


def test_composition_errors_name_the_spec():
    with pytest.raises(ValueError, match="want one kvpress press and one spectral/kivi method"):
        method_or_skip("snapkv:ratio=0.5+knorm:ratio=0.5")
    with pytest.raises(ValueError, match="want one kvpress press"):
        method_or_skip("exact+spectral")
