import pytest

from spectral_kv import SpectralConfig, SpectralCache


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("block_size", -4),
        ("block_size", 2.5),
        ("k_rank_keys", 0),
        ("k_rank_values", -1),
        ("k_rank_keys", 600),  # > block_size 512
        ("hot_buffer_size", 512),  # == block_size
        ("hot_buffer_size", 1000),
        ("hot_buffer_size", -1),
        ("sink_tokens", -2),
        ("coeff_bits", 5),
        ("coeff_bits", 16),
        ("value_bits", 7),
        ("value_bits", "half"),
        ("quant_group", 0),
        ("value_compressor", "no_such_compressor"),
        ("compressor", "no_such_compressor"),
        ("attention", "no_such_attention"),
        ("basis_dtype", "int8"),
        ("use_spectral_attention", "yes"),
        ("value_stats", "fp8"),
        ("value_stats", None),
    ],
)
def test_invalid_value_raises_naming_it(field, value):
    with pytest.raises(ValueError) as err:
        SpectralConfig(**{field: value}, **({"compressor": "exact_svd", "value_bits": "same"} if field.startswith("k_rank") else {}))
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_int4_needs_even_rank():
    with pytest.raises(ValueError, match="k_rank_values=15"):
        SpectralConfig(compressor="exact_svd", coeff_bits=4, value_bits="same", k_rank_keys=16, k_rank_values=15)


def test_svd_compressors_reject_bits_they_cannot_store():
    with pytest.raises(ValueError, match=r"value_bits=3 is not supported by compressor 'exact_svd' \(values\)"):
        SpectralConfig(compressor="exact_svd", coeff_bits=8, value_bits=3, k_rank_keys=16, k_rank_values=32)
    SpectralConfig(value_compressor="kivi4")  # KIVI is factored (identity basis): spectral serves it
    import plugins  # noqa: F401  registers test_raw, a compressor that is not factored

    with pytest.raises(ValueError, match="not factored"):
        SpectralConfig(value_compressor="test_raw", value_bits=None)


def test_rank_above_head_dim_rejected_against_model():
    from transformers import LlamaConfig

    model_config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1)
    with pytest.raises(ValueError, match="k_rank_values=32 exceeds the model's head_dim=16"):
        SpectralCache(SpectralConfig(compressor="exact_svd", value_bits="same", k_rank_keys=8, k_rank_values=32), model_config)
    # compressors without a rank (the default, hadamard) refuse ranks instead of ignoring them
    with pytest.raises(ValueError, match="k_rank_keys=8 has no effect under the layout keys='hadamard'"):
        SpectralConfig(k_rank_keys=8, k_rank_values=32)


def test_defaults_are_the_balanced_preset_with_the_original_tiers():
    c = SpectralConfig()
    assert (c.block_size, c.k_rank_keys, c.k_rank_values, c.hot_buffer_size) == (512, None, None, 64)
    assert c.use_spectral_attention and c.verbose and c.sink_tokens == 4
    assert c == SpectralConfig.preset("balanced")
    assert (c.compressor_name("keys"), c.bits("keys"), c.bits("values")) == ("hadamard", 4, 3)
    o = SpectralConfig.preset("original")
    assert (o.compressor, o.k_rank_keys, o.k_rank_values, o.coeff_bits, o.sink_tokens) == ("exact_svd", 16, 32, 8, 0)
    assert o.bits("values") == 8
    with pytest.raises(ValueError, match="no_such_preset"):
        SpectralConfig.preset("no_such_preset")
    assert c.attention_name == "spectral"
    assert SpectralConfig(use_spectral_attention=False).attention_name == "reconstruct"


def test_replace_rejects_unknown_field():
    with pytest.raises(ValueError, match="no_such"):
        SpectralConfig().replace(no_such=1)


def test_frozen():
    with pytest.raises(Exception):
        SpectralConfig().block_size = 3


@pytest.mark.parametrize("layout,name", [
    (dict(compressor="exact_svd", k_rank_keys=16, k_rank_values=16, value_bits="same"), "keys='exact_svd', values='exact_svd'"),
    (dict(value_compressor="randomized_svd", k_rank_values=16, value_bits=8), "keys='hadamard', values='randomized_svd'"),
])
def test_value_stats_on_a_layout_without_per_token_value_statistics_is_refused(layout, name):
    """Nothing silently ignored: byte statistics need a values compressor that keeps per-token
    statistics (grouped or spectral_quant values); the error names the field and the layout."""
    SpectralConfig(**layout)
    with pytest.raises(ValueError, match=rf"value_stats='byte' has no effect under the layout {name}"):
        SpectralConfig(**layout, value_stats="byte")
    with pytest.raises(ValueError, match=r"value_stats='byte' has no effect: the values compressor 'hadamard' stores "
                                         r"them unquantized \(value_bits=None\)"):
        SpectralConfig(value_bits=None, value_stats="byte")


def test_value_stats_default_keeps_every_preset_and_names_itself_in_the_summary():
    from spectral_kv.presets import PRESETS

    for name in PRESETS:
        assert SpectralConfig.preset(name).value_stats == "fp16"
    for layout in (dict(), dict(value_compressor="kivi2"), dict(value_compressor="spectral_quant")):
        cfg = SpectralConfig(**layout, value_stats="byte", verbose=False)
        assert "byte stats" in cfg.summary().split("values ")[1]
        assert "byte stats" not in SpectralConfig(**layout, verbose=False).summary()
