"""transformers cache operations on SpectralCache, each against DynamicCache at lossless settings:
crop (and assisted decoding, which uses it), reset, reorder_cache, batch_select_indices,
batch_repeat_interleave; crops that would cut into a compressed block or across padding raise."""

import pytest
import torch
from test_integration import LOSSLESS, LOSSY, greedy, tiny
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv.integrations.transformers import COUNTERS

# hot window wide enough for the assistant's candidate runs (crop removes the rejected ones)
CROPPABLE = LOSSLESS.replace(hot_buffer_size=8)


@pytest.fixture(scope="module")
def model():
    m = tiny("llama")
    m.set_attn_implementation("spectral_kv")
    return m


def _left_padded(lengths, seed=21):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(1, 96, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def _decode(model, cache, tok, mask, steps):
    """Greedy steps from ``tok`` [B]; returns (tokens [B, steps], last logits, mask)."""
    out, logits = [], None
    for _ in range(steps):
        mask = torch.cat((mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)), dim=1)
        with torch.no_grad():
            logits = model(tok[:, None], attention_mask=mask, past_key_values=cache).logits[:, -1]
        tok = logits.argmax(-1)
        out.append(tok)
    return torch.stack(out, dim=1), logits, mask


def _run(model, cache, op, index, lengths=(40, 29, 35), steps=6):
    """Prefill a left-padded batch, decode 3 steps, apply ``op`` to the cache (and ``index`` to
    the running rows), decode ``steps`` more."""
    ids, mask = _left_padded(lengths)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]
    first, _, mask = _decode(model, cache, logits.argmax(-1), mask, 3)
    op(cache)
    tok, mask = first[:, -1][index], mask[index]
    return _decode(model, cache, tok, mask, steps)


@pytest.mark.parametrize(
    "name, op, index",
    [
        ("reorder_cache", lambda c: c.reorder_cache(torch.tensor([2, 0, 0])), [2, 0, 0]),
        ("batch_select_indices", lambda c: c.batch_select_indices(torch.tensor([2, 1])), [2, 1]),
        ("batch_select_bool", lambda c: c.batch_select_indices(torch.tensor([True, False, True])), [0, 2]),
        ("batch_repeat_interleave", lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
    ],
)
def test_batch_operation_matches_dynamic_cache(model, name, op, index):
    exp_tokens, exp_logits, _ = _run(model, DynamicCache(), op, index)
    cache = sk.SpectralCache(LOSSLESS, model.config)
    got_tokens, got_logits, _ = _run(model, cache, op, index)
    assert torch.equal(got_tokens, exp_tokens), name
    assert torch.allclose(got_logits, exp_logits, atol=1e-4), name
    assert all(sum(layer.tiers.n_cold) > 0 for layer in cache.spectral_layers)  # ops moved compressed blocks
    assert cache.spectral_layers[0].tiers.batch_size == len(index)


def test_crop_matches_dynamic_cache(model):
    def op(c):
        c.crop(torch.tensor(-3))  # transformers 5.17 passes a 0-d tensor
        c.crop(c.get_seq_length() - 2)

    # after the crop, continue from the same rows; both caches have forgotten the same 5 positions
    exp = _run(model, DynamicCache(), op, [0, 1, 2])
    cache = sk.SpectralCache(CROPPABLE, model.config)
    got = _run(model, cache, op, [0, 1, 2])
    assert torch.equal(got[0], exp[0]) and torch.allclose(got[1], exp[1], atol=1e-4)
    assert cache.get_seq_length() == 40 + 3 - 5 + 6


def test_reset_then_reuse_equals_a_fresh_cache(model):
    ids = torch.randint(1, 96, (1, 45), generator=torch.Generator().manual_seed(22))
    fresh = greedy(model, ids, n=8, past_key_values=sk.SpectralCache(LOSSY, model.config))
    cache = sk.SpectralCache(LOSSY, model.config)
    greedy(model, torch.randint(1, 96, (2, 30)), n=4, past_key_values=cache)  # other batch size
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_report()["total_bytes"] == 0
    assert torch.equal(greedy(model, ids, n=8, past_key_values=cache), fresh)


def test_assisted_decoding_matches_dynamic_cache(model, monkeypatch):
    assistant = tiny("llama", num_hidden_layers=1)
    assistant.generation_config.num_assistant_tokens = 4
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    ids = torch.randint(1, 96, (1, 37), generator=torch.Generator().manual_seed(23))
    expected = greedy(model, ids, n=30, past_key_values=DynamicCache(), assistant_model=assistant)
    crops = []
    original = sk.SpectralCache.crop
    monkeypatch.setattr(sk.SpectralCache, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    cache = sk.SpectralCache(CROPPABLE, model.config)
    got = greedy(model, ids, n=30, past_key_values=cache, assistant_model=assistant)
    assert torch.equal(got, expected)
    assert crops, "assisted decoding never cropped the main cache"
    assert all(sum(layer.tiers.n_cold) >= 3 for layer in cache.spectral_layers)  # crossed several blocks


def test_crop_into_a_compressed_block_or_across_padding_is_refused():
    tm = sk.TierManager(LOSSY, name="layer 0")
    tm.append(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    # 40 = 2 sinks + 2 blocks of 16 + 6 exact: the 6 newest can go, the 7th is compressed
    assert tm.n_cold == [2] and tm.n_exact == [8]
    with pytest.raises(NotImplementedError, match=r"crop\(max_length=33\) would remove 7 tokens.*positions >= 34"):
        tm.crop(33)
    tm.crop(34)
    assert tm.tokens() == [34] and tm.seen == 34
    padded = sk.TierManager(LOSSY)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3] = False  # row 1: a padding position among the newest
    padded.append(torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16), valid)
    padded.crop(4)  # the newest position is real in both rows
    with pytest.raises(NotImplementedError, match="batch row 1 are known to be real tokens"):
        padded.crop(3)
    with pytest.raises(TypeError, match="needs an int"):
        padded.crop(2.0)


@pytest.mark.parametrize("zero_removes_nothing", [True, False])
def test_crop_zero_follows_the_installed_transformers_convention(monkeypatch, zero_removes_nothing):
    # transformers >= 5.17 calls crop(-n) after every assisted step, n possibly 0 (remove nothing);
    # up to 5.1x crop(0) means "keep 0 positions" (everything goes, which is exact too).
    import spectral_kv.integrations.transformers.cache as integ

    monkeypatch.setattr(integ, "CROP_ZERO_REMOVES_NOTHING", zero_removes_nothing)
    layer = integ.SpectralLayer(LOSSY, 0)
    layer.tiers.append(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
    assert layer.tiers.n_cold == [2]
    layer.crop(torch.tensor(0))
    if zero_removes_nothing:
        assert layer.tiers.tokens() == [40] and layer.get_seq_length() == 40
    else:
        assert not layer.tiers.initialized and layer.get_seq_length() == 0
        assert layer.tiers.memory_report()["total_bytes"] == 0


def test_assisted_decoding_draft_longer_than_the_hot_window_is_refused_up_front(model):
    """transformers' default draft (20 tokens, or a heuristic schedule bounded only by
    max_new_tokens) against hot_buffer_size: a ValueError naming both before anything runs."""
    patch = sk.patch_unsloth_attention(model, config=CROPPABLE, verbose=False)  # hot_buffer_size=8
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(24))
    try:
        assistant = tiny("llama", num_hidden_layers=1)
        calls = COUNTERS["spectral_calls"]
        with pytest.raises(ValueError, match=r"drafts up to 20 tokens \(num_assistant_tokens=20\), more than hot_buffer_size=8"):
            greedy(model, ids, n=30, assistant_model=assistant)
        assert COUNTERS["spectral_calls"] == calls  # refused before the prefill
        assistant.generation_config.num_assistant_tokens = 4
        assistant.generation_config.num_assistant_tokens_schedule = "heuristic"
        with pytest.raises(ValueError, match=r"'heuristic' schedule, which grows it up to max_new_tokens=30"):
            greedy(model, ids, n=30, assistant_model=assistant)
        with pytest.raises(ValueError, match=r"prompt_lookup_num_tokens=10\), more than hot_buffer_size=8"):
            greedy(model, ids, n=30, prompt_lookup_num_tokens=10)
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assert greedy(model, ids, n=12, assistant_model=assistant).shape[1] == 32  # within the window: runs
    finally:
        patch.unpatch()
