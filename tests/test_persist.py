"""Save / load of a SpectralCache: a reloaded cache continues generation token-identically, and
every way a file can be wrong (model, config, dtype, corruption, truncation) is a clear error."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_integration import LOSSY, greedy, tiny

import spectral_kv as sk
from spectral_kv.integrations.transformers.persist import FORMAT

# The SVD layout (int8 coefficients, fp16 bases) at a block size the tiny model fills; the
# default (hadamard) layout is checked by test_default_layout_round_trips.
SAVED = sk.SpectralConfig.preset("fast", block_size=16, hot_buffer_size=4, sink_tokens=2, k_rank_keys=4, k_rank_values=6, verbose=False)


def _generated_cache(model, n_prompt=75, n_new=20):
    model.set_attn_implementation("spectral_kv")
    ids = torch.randint(1, 96, (2, n_prompt), generator=torch.Generator().manual_seed(11))
    cache = sk.SpectralCache(SAVED, model.config)
    out = greedy(model, ids, n=n_new, past_key_values=cache)
    return out, cache


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny("llama")
    out, cache = _generated_cache(model)
    path = tmp_path_factory.mktemp("persist") / "cache.safetensors"
    digest = cache.save(path)
    return model, out, cache, path, digest


def _tier_tensors(cache):
    return [t for layer in cache.spectral_layers for t in layer.tiers.held_tensors()]


def test_reloaded_cache_continues_token_identically(saved):
    model, out, cache, path, digest = saved
    assert len(digest) == 64
    loaded = sk.SpectralCache.load(path, model)
    # compressed blocks really exist and came back bit for bit
    assert all(min(layer.tiers.n_cold) >= 5 for layer in loaded.spectral_layers)
    assert "scales" in loaded.spectral_layers[0].tiers.cold_k.parts  # int8 coefficients
    for a, b in zip(_tier_tensors(cache), _tier_tensors(loaded), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.get_seq_length() == cache.get_seq_length() == out.shape[1] - 1
    # continue both from the same tokens: identical outputs
    original = greedy(model, out, n=12, past_key_values=cache)
    reloaded = greedy(model, out, n=12, past_key_values=loaded)
    assert torch.equal(original, reloaded)
    # ...and the continuation differs from a fresh lossless run somewhere in the cache (lossy really used)
    assert loaded.memory_report()["ratio"] > 1.5


def test_default_layout_round_trips(tmp_path):
    model = tiny("llama")
    model.set_attn_implementation("spectral_kv")
    ids = torch.randint(1, 96, (2, 75), generator=torch.Generator().manual_seed(11))
    cfg = sk.SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, verbose=False)
    cache = sk.SpectralCache(cfg, model.config)
    out = greedy(model, ids, n=20, past_key_values=cache)
    cache.save(tmp_path / "d.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "d.safetensors", model)
    assert "zero" in loaded.spectral_layers[0].tiers.cold_v.parts and min(loaded.spectral_layers[0].tiers.n_cold) >= 5
    for a, b in zip(_tier_tensors(cache), _tier_tensors(loaded), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(greedy(model, out, n=8, past_key_values=cache), greedy(model, out, n=8, past_key_values=loaded))


def test_bf16_cache_round_trips(tmp_path):
    model = tiny("qwen3").to(torch.bfloat16)
    out, cache = _generated_cache(model, n_prompt=40, n_new=5)
    cache.save(tmp_path / "c.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "c.safetensors", model)
    assert loaded.spectral_layers[0].tiers.exact_k.dtype == torch.bfloat16
    for a, b in zip(_tier_tensors(cache), _tier_tensors(loaded), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"holds bfloat16 keys/values, the model runs in torch.float32"):
        sk.SpectralCache.load(tmp_path / "c.safetensors", tiny("qwen3"))


def test_wrong_model_is_named(saved):
    _, _, _, path, _ = saved
    with pytest.raises(ValueError, match=r"another model \(num_hidden_layers: saved 2, model has 3\)"):
        sk.SpectralCache.load(path, tiny("llama", num_hidden_layers=3).config)
    with pytest.raises(ValueError, match=r"num_key_value_heads: saved 2, model has 4"):
        sk.SpectralCache.load(path, tiny("llama", num_key_value_heads=4).config)
    with pytest.raises(ValueError, match=r"model_type: saved 'llama', model has 'qwen3'"):
        sk.SpectralCache.load(path, tiny("qwen3").config)


def test_wrong_config_is_named(saved):
    _, _, _, path, _ = saved
    with pytest.raises(ValueError, match=r"SpectralConfig mismatch \(k_rank_keys: saved 4, given 8\)"):
        sk.SpectralCache.load(path, tiny("llama").config, config=SAVED.replace(k_rank_keys=8))
    # verbose is not part of the identity
    sk.SpectralCache.load(path, tiny("llama").config, config=SAVED.replace(verbose=True))


def test_truncated_file(saved, tmp_path):
    _, _, _, path, _ = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            sk.SpectralCache.load(bad, tiny("llama").config)


def test_corrupted_tensor_bytes_fail_the_checksum(saved, tmp_path):
    _, _, _, path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # a bit inside the last tensor's data
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        sk.SpectralCache.load(bad, tiny("llama").config)


def _rewrite(path, dst, edit):
    """Copy a saved cache, letting ``edit(tensors)`` change it, keeping the stored header."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


def test_tampered_shapes_fail_the_checksum_and_other_files_are_refused(saved, tmp_path):
    _, _, _, path, _ = saved
    _rewrite(path, tmp_path / "t.safetensors", lambda t: t.update({"layers.0.exact_k": t["layers.0.exact_k"][:, :, :-1].contiguous()}))
    with pytest.raises(ValueError, match="checksum mismatch"):
        sk.SpectralCache.load(tmp_path / "t.safetensors", tiny("llama").config)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a spectral_kv cache"):
        sk.SpectralCache.load(tmp_path / "plain.safetensors", tiny("llama").config)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sk.SpectralCache.load(tmp_path / "missing.safetensors", tiny("llama").config)


def test_shape_validation_names_the_tensor(saved, tmp_path, monkeypatch):
    """A consistent file (checksum recomputed) whose tensors disagree with the config is refused."""
    import spectral_kv.integrations.transformers.persist as persist

    model, _, cache, _, _ = saved
    layer = cache.spectral_layers[1].tiers
    original = layer.cold_v.parts["basis"]
    layer.cold_v.parts["basis"] = original.float()  # wrong dtype for basis_dtype=float16
    try:
        cache.save(tmp_path / "w.safetensors")
    finally:
        layer.cold_v.parts["basis"] = original
    with pytest.raises(ValueError, match=r"layer 1 cold_v.basis is torch.float32 .* expected torch.float16"):
        sk.SpectralCache.load(tmp_path / "w.safetensors", model)
    monkeypatch.setattr(persist, "FORMAT", "spectral_kv.cache/0")
    with pytest.raises(ValueError, match=f"unsupported cache format '{FORMAT}'"):
        sk.SpectralCache.load(tmp_path / "w.safetensors", model)


def test_exact_layers_and_empty_cache_round_trip(tmp_path):
    model = tiny("mistral", sliding_window=24)  # both layers sliding: kept exact by transformers' layers
    model.set_attn_implementation("spectral_kv")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    cache = sk.SpectralCache(LOSSY, model.config)
    out = greedy(model, ids, n=5, past_key_values=cache)
    cache.save(tmp_path / "s.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "s.safetensors", model)
    assert torch.equal(loaded.layers[0].keys, cache.layers[0].keys)
    assert torch.equal(greedy(model, out, n=5, past_key_values=loaded), greedy(model, out, n=5, past_key_values=cache))
    empty = sk.SpectralCache(LOSSY, model.config)
    empty.save(tmp_path / "e.safetensors")
    assert sk.SpectralCache.load(tmp_path / "e.safetensors", model).get_seq_length() == 0


def test_other_storage_formats_are_refused(saved, tmp_path, monkeypatch):
    """Files of another storage form of cold blocks (format 1: codes packed per token, no
    ``storage_format`` in the header) are refused with a clear error, not misread."""
    import json

    import spectral_kv.integrations.transformers.persist as persist

    model, _, _, path, _ = saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[persist.META_KEY])
    assert header["storage_format"] == persist.STORAGE_FORMAT == 2
    del header["storage_format"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={persist.META_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match="saved with storage format 1, this version reads 2: re-create the cache"):
        sk.SpectralCache.load(tmp_path / "old.safetensors", model)
    monkeypatch.setattr(persist, "STORAGE_FORMAT", 3)
    with pytest.raises(ValueError, match="saved with storage format 2, this version reads 3"):
        sk.SpectralCache.load(path, model)


def test_byte_value_statistics_round_trip_and_files_without_the_field_load_as_fp16(tmp_path):
    """value_stats is recorded in the saved config: a byte-statistics cache reloads bit for bit
    (uint8/int8 statistics), a config of the other form is refused naming the field, and a file
    written before the field existed (no value_stats in its header) loads with the default."""
    import json

    import spectral_kv.integrations.transformers.persist as persist

    model = tiny("llama")
    model.set_attn_implementation("spectral_kv")
    ids = torch.randint(1, 96, (2, 75), generator=torch.Generator().manual_seed(11))
    cfg = sk.SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, verbose=False, value_stats="byte")
    cache = sk.SpectralCache(cfg, model.config)
    out = greedy(model, ids, n=20, past_key_values=cache)
    cache.save(tmp_path / "b.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "b.safetensors", model)
    parts = loaded.spectral_layers[0].tiers.cold_v.parts
    assert (parts["scale"].dtype, parts["zero"].dtype) == (torch.uint8, torch.int8) and loaded.config.value_stats == "byte"
    for a, b in zip(_tier_tensors(cache), _tier_tensors(loaded), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(greedy(model, out, n=8, past_key_values=cache), greedy(model, out, n=8, past_key_values=loaded))
    with pytest.raises(ValueError, match=r"SpectralConfig mismatch \(value_stats: saved 'byte', given 'fp16'\)"):
        sk.SpectralCache.load(tmp_path / "b.safetensors", model, config=cfg.replace(value_stats="fp16"))
    # an older file: the default form, no value_stats in the header (checksum recomputed as it was written)
    old_cfg = cfg.replace(value_stats="fp16")
    old = sk.SpectralCache(old_cfg, model.config)
    greedy(model, ids, n=5, past_key_values=old)
    old.save(tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        header = json.loads(f.metadata()[persist.META_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del header["config"]["value_stats"], header["sha256"]
    header["sha256"] = persist._checksum(header, tensors)
    save_file(tensors, str(tmp_path / "o.safetensors"), metadata={persist.META_KEY: json.dumps(header)})
    assert sk.SpectralCache.load(tmp_path / "o.safetensors", model).config.value_stats == "fp16"
    sk.SpectralCache.load(tmp_path / "o.safetensors", model, config=old_cfg)
    with pytest.raises(ValueError, match=r"value_stats: saved 'fp16', given 'byte'"):
        sk.SpectralCache.load(tmp_path / "o.safetensors", model, config=cfg)
    # and a version that does not know the field refuses a file that has it, naming it
    header["config"]["value_stats"] = "byte"
    header["config"]["no_such_field"] = 1
    del header["sha256"]
    header["sha256"] = persist._checksum(header, tensors)
    save_file(tensors, str(tmp_path / "n.safetensors"), metadata={persist.META_KEY: json.dumps(header)})
    with pytest.raises(ValueError, match=r"fields this version does not know: \['no_such_field'\]"):
        sk.SpectralCache.load(tmp_path / "n.safetensors", model)
