"""The default attention (``attention=None``) and the `fused` strategy's routing to the kernels.

On CUDA the default is the layout's fused kernel wherever one exists; CI has no GPU, so the
choice is tested through `default_decode_attention` with a CUDA device object, and the routing
itself runs the kernels under Triton's interpreter (``attention="fused"``).
"""

import warnings

import pytest
import torch
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv.attention import fused as fused_mod
from spectral_kv.compressors import COMPRESSORS
from test_integration import greedy, tiny

needs_triton = pytest.mark.skipif(not fused_mod.HAS_TRITON, reason="triton is not installed")
CUDA = torch.device("cuda")


def _comps(cfg):
    return (COMPRESSORS[cfg.compressor_name("keys")](cfg, "keys", cfg.k_rank_keys),
            COMPRESSORS[cfg.compressor_name("values")](cfg, "values", cfg.k_rank_values))


@needs_triton
@pytest.mark.parametrize("preset,kernel", [("balanced", "quant"), ("max-compression", "quant"), ("fast", "svd"),
                                           ("original", "svd")])
def test_default_on_cuda_is_the_layouts_kernel(preset, kernel):
    cfg = sk.SpectralConfig.preset(preset, verbose=False)
    kc, vc = _comps(cfg)
    assert fused_mod.layout_kernel(cfg, kc, vc) == kernel
    assert fused_mod.default_decode_attention(cfg, kc, vc, CUDA) == "fused"
    assert fused_mod.default_decode_attention(cfg, kc, vc, torch.device("cpu")) == "spectral"


@needs_triton
def test_a_layout_without_kernel_says_so_once_on_cuda(monkeypatch):
    monkeypatch.setattr(fused_mod, "_REPORTED", set())
    cfg = sk.SpectralConfig(coeff_bits=None, value_bits=None, verbose=False)  # unquantized: no codes to read
    kc, vc = _comps(cfg)
    with pytest.warns(RuntimeWarning, match="torch 'spectral' strategy on CUDA"):
        assert fused_mod.default_decode_attention(cfg, kc, vc, CUDA) == "spectral"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused_mod.default_decode_attention(cfg, kc, vc, CUDA) == "spectral"  # once per layout
    explicit = cfg.replace(attention="reconstruct")
    assert fused_mod.default_decode_attention(explicit, kc, vc, CUDA) == "reconstruct"


@needs_triton
def test_fused_with_no_kernel_for_the_layout_warns_and_counts_every_fallback(monkeypatch):
    monkeypatch.setattr(fused_mod, "_REPORTED", set())
    cfg = sk.SpectralConfig(block_size=16, hot_buffer_size=4, quant_group=16, coeff_bits=None, value_bits=None,
                            attention="fused", verbose=False)
    model = tiny("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="no fused kernel reads the layout"):
        cache = sk.SpectralCache(cfg, model.config)
    patch = sk.patch_unsloth_attention(model, config=cfg)
    try:
        greedy(model, ids, n=6, past_key_values=cache)
    finally:
        patch.unpatch()
    strategies = [layer.strategy for layer in cache.spectral_layers]
    assert all(s.kernel is None and s.kernel_calls == 0 and s.fallback_calls == 5 for s in strategies)


@needs_triton
@pytest.mark.parametrize("compressor", ["hadamard", "kivi4"])
def test_exact_tail_through_the_quant_kernel_equals_dynamic_cache(compressor):
    """No block is compressed yet (block larger than the context): every decode step runs the
    kernel's exact-tail split only, which must reproduce DynamicCache's tokens."""
    model = tiny("llama")
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    expected = greedy(model, ids, n=6, past_key_values=DynamicCache())
    cfg = sk.SpectralConfig(block_size=64, hot_buffer_size=8, compressor=compressor, attention="fused", verbose=False,
                            **({} if compressor.startswith("kivi") else dict(quant_group=32)))
    patch = sk.patch_unsloth_attention(model, config=cfg)
    try:
        got = greedy(model, ids, n=6)
    finally:
        patch.unpatch()
    assert torch.equal(got, expected)
    strategies = [layer.strategy for layer in patch.last_cache.spectral_layers]
    assert all(s.kernel == "quant" and s.kernel_calls == 5 and s.fallback_calls == 0 for s in strategies)


@needs_triton
@pytest.mark.parametrize("preset", ["balanced", "compact", "max-compression"])
def test_fused_decode_over_cold_blocks_matches_the_torch_twin(preset):
    """Decode logits on forced tokens, cold blocks present: kernel (interpreter, fp32) vs `spectral`."""
    model = tiny("llama")
    ids = torch.randint(1, 96, (2, 48), generator=torch.Generator().manual_seed(4))
    base = sk.SpectralConfig.preset(preset, block_size=16, hot_buffer_size=4, sink_tokens=2, quant_group=16,
                                    verbose=False)
    logits = {}
    for name in ("spectral", "fused"):
        cache = sk.SpectralCache(base.replace(attention=name), model.config)
        patch = sk.patch_unsloth_attention(model, config=base.replace(attention=name))
        try:
            with torch.no_grad():
                model(ids[:, :40], past_key_values=cache)
                logits[name] = torch.stack([model(ids[:, i:i + 1], past_key_values=cache).logits[:, -1]
                                            for i in range(40, 48)])
        finally:
            patch.unpatch()
        if name == "fused":
            assert all(sum(layer.tiers.n_cold) >= 2 * 2 for layer in cache.spectral_layers)
            assert all(layer.strategy.kernel_calls == 8 and layer.strategy.fallback_calls == 0
                       for layer in cache.spectral_layers)
    rel = (logits["fused"] - logits["spectral"]).norm() / logits["spectral"].norm()
    assert rel < 1e-4
