"""transformers' generic cache behaviours (ported from its cache test suite) on SpectralCache,
each against DynamicCache at lossless settings, with compressed blocks in play: layers'
readable ``keys`` / ``values``, deepcopy, pickle, forward loops, chunked prefill, multi-turn
continuation, ``pipeline("text-generation")``; and what assigning ``keys`` / ``values`` means."""

import copy
import pickle

import pytest
import torch
from test_integration import LOSSLESS, LOSSY, greedy, tiny
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv.eval.tiny import tiny_hf_tokenizer, tiny_random_model


@pytest.fixture(scope="module")
def model():
    m = tiny("llama")
    m.set_attn_implementation("spectral_kv")
    return m


def _ids(n, seed=0, batch=1):
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


def _forward(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits[:, -1]


def _loop(model, cache, tok, steps):
    """Greedy forward loop (no generate) from ``tok`` [B]; tokens [B, steps] and the last logits."""
    out = []
    for _ in range(steps):
        logits = _forward(model, cache, tok[:, None])
        tok = logits.argmax(-1)
        out.append(tok)
    return torch.stack(out, 1), logits


def test_layer_keys_values_equal_dynamic_cache(model):
    ids = _ids(45, batch=2)
    exact, spec = DynamicCache(), sk.SpectralCache(LOSSLESS, model.config)
    _forward(model, exact, ids)
    _forward(model, spec, ids)
    _loop(model, exact, ids[:, -1], 3)
    _loop(model, spec, ids[:, -1], 3)
    assert all(sum(layer.tiers.n_cold) for layer in spec.spectral_layers)  # blocks really compressed
    for a, b in zip(exact.layers, spec.layers):
        assert b.keys.shape == a.keys.shape == (2, 2, 48, 16) and b.keys.dtype == a.keys.dtype
        assert torch.allclose(b.keys, a.keys, atol=1e-5) and torch.allclose(b.values, a.values, atol=1e-5)
    assert sk.SpectralCache(LOSSLESS, model.config).layers[0].keys is None  # empty, as DynamicLayer


def test_keys_of_a_lossy_layer_are_what_attention_reads(model):
    cache = sk.SpectralCache(LOSSY, model.config)
    _forward(model, cache, _ids(45))
    layer = cache.layers[0]
    k, v, _ = layer.tiers.materialize()
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))], ids=["deepcopy", "pickle"])
def test_copy_continues_like_the_original(model, clone):
    ids = _ids(40, seed=1)
    cache = sk.SpectralCache(LOSSY, model.config)
    logits = _forward(model, cache, ids)
    twin = clone(cache)
    assert twin is not cache and twin.layers[0].tiers is not cache.layers[0].tiers
    a = _loop(model, cache, logits.argmax(-1), 20)
    b = _loop(model, twin, logits.argmax(-1), 20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert cache.get_seq_length() == twin.get_seq_length() == 60


def test_forward_loop_matches_dynamic_cache(model):
    ids = _ids(30, seed=2)
    runs = []
    for cache in (DynamicCache(), sk.SpectralCache(LOSSLESS, model.config)):
        logits = _forward(model, cache, ids)
        runs.append(_loop(model, cache, logits.argmax(-1), 25))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.allclose(runs[0][1], runs[1][1], atol=1e-4)


def test_chunked_prefill_matches_dynamic_cache(model):
    ids = _ids(61, seed=3)
    logits = []
    for cache in (DynamicCache(), sk.SpectralCache(LOSSLESS, model.config)):
        for start in range(0, 61, 13):  # chunks that straddle block boundaries
            last = _forward(model, cache, ids[:, start : start + 13])
        logits.append(last)
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert cache.get_seq_length() == 61 and sum(cache.layers[0].tiers.n_cold) == 3


def test_multi_turn_continuation_matches_dynamic_cache(model):
    turn1, turn2 = _ids(30, seed=4), _ids(9, seed=5)
    outs = []
    for cache in (DynamicCache(), sk.SpectralCache(LOSSLESS, model.config)):
        first = greedy(model, turn1, n=12, past_key_values=cache)
        second = greedy(model, torch.cat((first, turn2), 1), n=12, past_key_values=cache)
        outs.append(second)
    assert torch.equal(outs[0], outs[1]) and outs[1].shape[1] == 30 + 12 + 9 + 12


def test_pipeline_text_generation_matches_dynamic_cache():
    from transformers import pipeline

    m, _ = tiny_random_model()
    tok = tiny_hf_tokenizer()
    m.generation_config.pad_token_id = m.generation_config.eos_token_id = 0
    pipe = pipeline("text-generation", model=m, tokenizer=tok)
    kw = dict(max_new_tokens=24, do_sample=False, return_full_text=False)
    text = "Spectral caches keep old tokens compressed. " * 2
    expected = pipe(text, **kw)[0]["generated_text"]
    patch = sk.patch_unsloth_attention(m, config=LOSSLESS, verbose=False)  # rank 16 = full rank of a 16-token block
    try:
        got = pipe(text, **kw)[0]["generated_text"]
        assert sum(patch.last_cache.layers[0].tiers.n_cold) >= 4
    finally:
        patch.unpatch()
    assert got == expected and len(got) > 0


# ---------------------------------------------------------------------------- assigning keys / values
def _prefilled(model, n=45, config=LOSSY):
    cache = sk.SpectralCache(config, model.config)
    _forward(model, cache, _ids(n, seed=6))
    return cache


def test_assigning_the_same_contents_changes_nothing(model):
    cache = _prefilled(model)
    layer = cache.layers[0]
    before = (layer.tiers.n_cold, layer.tiers.n_exact, layer.memory_report())
    layer.keys = layer.keys
    layer.values = layer.values
    assert (layer.tiers.n_cold, layer.tiers.n_exact, layer.memory_report()) == before


def test_assigning_a_prefix_crops_within_the_exact_tiers(model):
    cache = _prefilled(model)
    layer = cache.layers[0]
    keep = layer.tiers.seen - 3
    k, v = layer.keys[:, :, :keep], layer.values[:, :, :keep]
    layer.keys = k  # kvpress' _remove_answer_from_cache: keys first, then values
    assert layer.tiers.seen == 45  # waits for the values
    layer.values = layer.values[:, :, :keep]
    assert layer.tiers.seen == keep and torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    # a cut inside the compressed blocks: the kept block stays, the cut block's survivors are held
    # exactly as the (decompressed) values attention read, and the layer reads back the same
    for cut in (30, 10, 1):
        for each in cache.layers:
            dk, dv = each.keys[:, :, :cut], each.values[:, :, :cut]
            each.keys, each.values = dk, dv
            assert each.tiers.seen == cut and torch.equal(each.keys, dk) and torch.equal(each.values, dv)
            assert each.tiers.n_cold == [(cut - 2) // 16 if cut > 2 else 0]
    _forward(model, cache, _ids(40, seed=9))  # and it keeps working: new blocks compressed behind the kept ones
    assert layer.tiers.seen == 41 and layer.tiers.n_cold == [2]


def test_assigning_new_contents_before_compression_replaces_them(model):
    cache = sk.SpectralCache(LOSSY, model.config)
    _forward(model, cache, _ids(12, seed=7))  # below one block: nothing compressed
    layer = cache.layers[0]
    k, v = layer.keys, layer.values
    keep = torch.tensor([0, 2, 5, 7, 11])
    layer.keys, layer.values = k[:, :, keep], v[:, :, keep]
    assert layer.tiers.seen == 5 and cache.get_seq_length() == 5
    assert torch.equal(layer.keys, k[:, :, keep]) and torch.equal(layer.values, v[:, :, keep])
    layer.keys = layer.keys * 2  # same shape as the values: applied at once
    assert torch.equal(layer.keys, 2 * k[:, :, keep]) and torch.equal(layer.values, v[:, :, keep])


def test_assigning_new_contents_after_compression_is_refused(model):
    layer = _prefilled(model).layers[0]
    k, v = layer.keys, layer.values
    layer.keys = k[:, :, ::2]
    with pytest.raises(NotImplementedError, match=r"writing layer.keys/values .* compressed block"):
        layer.values = v[:, :, ::2]


def test_a_half_written_layer_is_refused_at_the_next_update(model):
    cache = sk.SpectralCache(LOSSY, model.config)
    _forward(model, cache, _ids(12, seed=8))
    cache.layers[0].keys = cache.layers[0].keys[:, :, :5]
    with pytest.raises(ValueError, match=r"layer.keys was assigned \(1, 2, 5, 16\)"):
        _forward(model, cache, _ids(1))


def test_bad_assignments_name_the_value(model):
    layer = _prefilled(model).layers[0]
    with pytest.raises(ValueError, match="would drop 45 positions"):
        layer.keys = None
    with pytest.raises(ValueError, match=r"must be a \[batch, kv_heads, tokens, head_dim\] tensor"):
        layer.values = torch.zeros(3)
