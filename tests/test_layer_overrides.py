"""`SpectralConfig.layer_overrides`: per-layer cold layouts, validated, honoured by the cache,
its memory report, save / load and the memory table."""

import dataclasses
import json

import pytest
import torch
from test_integration import greedy, tiny

import spectral_kv as sk
from spectral_kv.memory import SHAPES, measure_memory

BASE = sk.SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, coeff_bits=3, value_bits=2,
                         value_stats="byte", verbose=False)
HI = dict(coeff_bits=4, value_bits=3)
MIXED = BASE.replace(layer_overrides={1: HI})


def _prompt(batch=2, n=75):
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(11))


def test_canonical_form_is_hashable_and_survives_json():
    a = BASE.replace(layer_overrides={range(3, 6): HI, 0: {"value_bits": 3}, (9, 7): {"key_segments": None}})
    assert a.layer_overrides == (((0,), (("value_bits", 3),)), ((3, 4, 5), (("coeff_bits", 4), ("value_bits", 3))),
                                 ((7, 9), (("key_segments", None),)))
    hash(a)
    back = sk.SpectralConfig(**json.loads(json.dumps(dataclasses.asdict(a))))
    assert back == a and hash(back) == hash(a)
    assert a.replace(seed=0) == a  # replace passes the canonical form through
    assert a.overridden_layers() == (0, 3, 4, 5, 7, 9)
    assert BASE.replace(layer_overrides={}).layer_overrides is None


def test_layer_config_applies_only_its_entry():
    c = BASE.replace(layer_overrides={(1, 3): HI})
    for i in (1, 3):
        assert (c.layer_config(i).coeff_bits, c.layer_config(i).value_bits, c.layer_config(i).layer_overrides) == (4, 3, None)
    for i in (0, 2, 40):
        assert c.layer_config(i) == BASE
    with pytest.raises(ValueError, match="-1"):
        c.layer_config(-1)


@pytest.mark.parametrize(
    "overrides,named",
    [
        ({-1: HI}, "-1"),
        ({True: HI}, "True"),
        ({"3": HI}, "'3'"),
        ({(1, 1): HI}, "listed twice"),
        ({1: HI, (0, 1): {"value_bits": 4}}, "layer 1 is given twice"),
        ({1: {"no_such_field": 1}}, "unknown SpectralConfig field 'no_such_field'"),
        ({1: {"hot_buffer_size": 8}}, "'hot_buffer_size' cannot differ per layer"),
        ({1: {"block_size": 32}}, "'block_size' cannot differ per layer"),
        ({1: {}}, "changes no field"),
        ({1: {"coeff_bits": 5}}, r"layers 1: .*coeff_bits"),
        ({range(4, 7): {"compressor": "no_such_compressor"}}, r"layers 4-6: .*no_such_compressor"),
        ([1, 2], "pairs"),
        ("1:4", "'1:4'"),
    ],
)
def test_bad_overrides_raise_naming_them(overrides, named):
    with pytest.raises(ValueError, match=named):
        BASE.replace(layer_overrides=overrides)


def test_summary_names_each_overridden_layout():
    s = BASE.replace(layer_overrides={(0, 1, 2, 5): HI}).summary()
    assert s.startswith(BASE.summary()) and "; layers 0-2, 5: keys hadamard int4" in s and "values hadamard int3" in s


def test_cache_layers_run_their_layout_and_bytes_follow():
    model = tiny("llama", num_hidden_layers=3)
    model.set_attn_implementation("spectral_kv")
    ids = _prompt()
    caches = {name: sk.SpectralCache(cfg, model.config) for name, cfg in
              (("lo", BASE), ("hi", BASE.replace(**HI)), ("mixed", MIXED))}
    outs = {name: greedy(model, ids, n=20, past_key_values=c) for name, c in caches.items()}
    assert [layer.config.coeff_bits for layer in caches["mixed"].layers] == [3, 4, 3]
    per = {name: c.memory_report()["per_layer"] for name, c in caches.items()}
    assert min(caches["mixed"].layers[1].tiers.n_cold) >= 4
    for i, src in enumerate(("lo", "hi", "lo")):  # each layer holds exactly its layout's bytes
        assert per["mixed"][i]["cold_keys"] == per[src][i]["cold_keys"]
        assert per["mixed"][i]["cold_values"] == per[src][i]["cold_values"]
    assert per["hi"][1]["cold_keys"] > per["lo"][1]["cold_keys"]
    # overriding every layer to the hi layout is the hi config, token for token
    every = sk.SpectralCache(BASE.replace(layer_overrides={range(3): HI}), model.config)
    assert torch.equal(greedy(model, ids, n=20, past_key_values=every), outs["hi"])


def test_cache_refuses_layers_the_model_lacks_or_keeps_exact():
    model = tiny("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="names layer 3, the model's cache has 3 layers"):
        sk.SpectralCache(BASE.replace(layer_overrides={(1, 3): HI}), model.config)
    sliding = tiny("mistral", sliding_window=24)
    with pytest.raises(ValueError, match=r"names layers \[0\], which this model keeps exact"):
        sk.SpectralCache(BASE.replace(layer_overrides={0: HI}), sliding.config)


def test_mixed_cache_round_trips_and_the_overrides_are_checked(tmp_path):
    model = tiny("llama", num_hidden_layers=3)
    model.set_attn_implementation("spectral_kv")
    cache = sk.SpectralCache(MIXED, model.config)
    out = greedy(model, _prompt(), n=20, past_key_values=cache)
    cache.save(tmp_path / "m.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "m.safetensors", model)
    assert loaded.config == MIXED and [layer.config.coeff_bits for layer in loaded.layers] == [3, 4, 3]
    for a, b in zip(cache.spectral_layers, loaded.spectral_layers, strict=True):
        for x, y in zip(a.tiers.held_tensors(), b.tiers.held_tensors(), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(greedy(model, out, n=8, past_key_values=cache), greedy(model, out, n=8, past_key_values=loaded))
    with pytest.raises(ValueError, match=r"SpectralConfig mismatch \(layer_overrides: saved"):
        sk.SpectralCache.load(tmp_path / "m.safetensors", model, config=BASE)


def test_memory_table_counts_each_layout():
    shape = SHAPES["smollm2"]
    lo = sk.SpectralConfig.preset("max-compression", value_stats="byte", quant_group=256, hot_buffer_size=256, verbose=False)
    hi = lo.replace(**HI)
    mixed = lo.replace(layer_overrides={(6, 7, 8, *range(15, 27)): HI})
    row = lambda c: measure_memory(shape, (8192,), c)[0]  # noqa: E731
    r_lo, r_hi, r_mix = row(lo), row(hi), row(mixed)
    assert r_mix["spectral_mb"] == pytest.approx((r_lo["spectral_mb"] + r_hi["spectral_mb"]) / 2, rel=1e-12)
    assert r_lo["spectral_mb"] < r_mix["spectral_mb"] < r_hi["spectral_mb"]
    with pytest.raises(ValueError, match="names layer 30, SmolLM2-135M has 30 layers"):
        measure_memory(shape, (1024,), lo.replace(layer_overrides={30: HI}))
