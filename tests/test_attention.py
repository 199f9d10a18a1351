import dataclasses

import torch
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from spectral_kv import ATTENTION_STRATEGIES, SpectralConfig, TierManager
from spectral_kv.attention import reference_attention
from spectral_kv.compressors import COMPRESSORS
from spectral_kv.compressors.grouped import HadamardCompressor


def _filled(cfg, batch, h, d, sizes, pad_p, seed):
    g = torch.Generator().manual_seed(seed)
    tm = TierManager(cfg)
    for t in sizes:
        tm.append(torch.randn(batch, h, t, d, generator=g), torch.randn(batch, h, t, d, generator=g), torch.rand(batch, t, generator=g) >= pad_p)
    return tm, g


def _attend(name, cfg, tm, q, new_k, new_v, scaling):
    """Attend q over the tiers plus the new tokens (causal among them), as SpectralLayer does:
    the tier manager's view stages the new tokens and builds the masks."""
    view = tm.view(new_k, new_v)
    strat = ATTENTION_STRATEGIES[name](cfg, tm.key_compressor, tm.value_compressor)
    return strat.attend(q, view, scaling)


# Key / value compressor pairings: per-block SVD bases, hadamard's shared rotation, and mixed.
LAYOUTS = {
    "exact_svd": dict(compressor="exact_svd"),
    "hadamard": dict(compressor="hadamard"),
    "svd_keys_hadamard_values": dict(compressor="exact_svd", value_compressor="hadamard"),
    "hadamard_keys_svd_values": dict(compressor="hadamard", value_compressor="exact_svd"),
}


def _layout(layout, k, v, **svd_only):
    """The layout's fields, plus ranks (and ``svd_only`` fields) for the roles an SVD compresses:
    a field no role's compressor reads must stay unset."""
    cfg = dict(LAYOUTS[layout])
    keys_svd = cfg["compressor"] == "exact_svd"
    values_svd = (cfg.get("value_compressor") or cfg["compressor"]) == "exact_svd"
    cfg.update({"k_rank_keys": k} if keys_svd else {}, **({"k_rank_values": v} if values_svd else {}))
    return {**cfg, **svd_only} if keys_svd or values_svd else cfg


def _values_hadamard(layout):
    return "hadamard" in (LAYOUTS[layout].get("value_compressor") or LAYOUTS[layout]["compressor"])


shapes = dict(
    batch=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.integers(1, 3), d=st.sampled_from([4, 8, 12, 16]),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), tq=st.integers(1, 4), pad_p=st.floats(0, 0.3), seed=st.integers(0, 10**6),
)


@given(bits=st.sampled_from([None, 8, 4]), layout=st.sampled_from(sorted(LAYOUTS)), **shapes)
def test_spectral_equals_reconstruct(bits, layout, batch, kv_heads, group, d, sizes, tq, pad_p, seed):
    vbits = 3 if _values_hadamard(layout) else 8
    cfg = SpectralConfig(block_size=8, hot_buffer_size=2, sink_tokens=1, coeff_bits=bits,
                         value_bits=vbits, **_layout(layout, 2, 4))
    tm, g = _filled(cfg, batch, kv_heads, d, sizes, pad_p, seed)
    q = torch.randn(batch, kv_heads * group, tq, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, tq, d, generator=g), torch.randn(batch, kv_heads, tq, d, generator=g)
    a = _attend("spectral", cfg, tm, q, nk, nv, d**-0.5)
    b = _attend("reconstruct", cfg, tm, q, nk, nv, d**-0.5)
    assert torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)


@given(name=st.sampled_from(["spectral", "reconstruct"]), layout=st.sampled_from(sorted(LAYOUTS)), **shapes)
def test_full_rank_lossless_equals_exact_attention(name, layout, batch, kv_heads, group, d, sizes, tq, pad_p, seed):
    # Full-rank SVD with float32 bases and unquantized hadamard coefficients are both lossless.
    cfg = SpectralConfig(block_size=16, hot_buffer_size=2, sink_tokens=1, coeff_bits=None,
                         value_bits="same", **_layout(layout, d, d, basis_dtype="float32"))
    tm, g = _filled(cfg, batch, kv_heads, d, sizes, pad_p, seed)
    q = torch.randn(batch, kv_heads * group, tq, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, tq, d, generator=g), torch.randn(batch, kv_heads, tq, d, generator=g)
    causal = torch.ones(tq, tq, dtype=torch.bool).tril().expand(batch, 1, tq, tq)
    out = _attend(name, cfg, tm, q, nk, nv, 0.3)
    # the uncompressed reference: every real token of each row, then the new ones
    keys, values, valid = tm.materialize()
    n = keys.shape[2]
    vmask = torch.ones(batch, n, dtype=torch.bool) if valid is None else valid
    mask = torch.cat((vmask[:, None, None, :].expand(batch, 1, tq, n), causal), dim=-1)
    ref = reference_attention(q, torch.cat((keys, nk), 2), torch.cat((values, nv), 2), mask, 0.3)
    assert torch.allclose(out.double(), ref, atol=1e-4)


@pytest.mark.parametrize("layout", ["hadamard", "svd_keys_hadamard_values", "hadamard_keys_svd_values"])
def test_spectral_applies_a_shared_basis_once_not_per_block(layout, monkeypatch):
    # hadamard's rotation is the basis of every block: spectral attention must apply it once per
    # step (shared_basis), never as basis()'s per-block [B, H, NB, D, D] expansion, which the
    # old code copied (reshape) at every decode step. Ragged rows, GQA and a mask included.
    d, batch, kv_heads, group, tq = 12, 2, 2, 3, 2  # 12: a non-symmetric rotation (Sylvester-Hadamard is)
    cfg = SpectralConfig(block_size=8, hot_buffer_size=2, sink_tokens=1, coeff_bits=None,
                         value_bits="same", **_layout(layout, 4, 4, basis_dtype="float32"))
    g = torch.Generator().manual_seed(1)
    tm = TierManager(cfg)
    valid = torch.arange(40) >= torch.tensor([[0], [20]])  # row 1 is left-padded by 20 tokens
    tm.append(torch.randn(batch, kv_heads, 40, d, generator=g), torch.randn(batch, kv_heads, 40, d, generator=g), valid)
    assert tm.n_cold == [4, 2]  # ragged: cold_valid masks row 1's missing blocks
    q = torch.randn(batch, kv_heads * group, tq, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, tq, d, generator=g), torch.randn(batch, kv_heads, tq, d, generator=g)
    expected = _attend("reconstruct", cfg, tm, q, nk, nv, d**-0.5)

    def per_block_basis(self, parts):
        raise AssertionError("spectral attention expanded a shared basis per block")

    monkeypatch.setattr(HadamardCompressor, "basis", per_block_basis)
    out = _attend("spectral", cfg, tm, q, nk, nv, d**-0.5)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_shared_basis_is_the_basis_of_every_block():
    cfg = SpectralConfig(block_size=8, hot_buffer_size=2, quant_group=8)
    for name in ("hadamard", "exact_svd"):
        comp = COMPRESSORS[name](cfg, "keys", 4)
        parts = {k: v.reshape(2, 3, *v.shape[1:]) for k, v in comp.compress(torch.randn(6, 8, 16)).items()}
        shared = comp.shared_basis(parts)
        if name == "exact_svd":
            assert shared is None  # a basis per block
        else:
            assert shared.shape == (16, 16) and shared.dtype == torch.float32
            assert torch.equal(comp.basis(parts), shared.expand(2, 3, 16, 16))


def test_query_that_sees_nothing_gets_zeros_not_nan():
    cfg = SpectralConfig.preset("fast", block_size=8, k_rank_keys=2, k_rank_values=2, hot_buffer_size=2)
    tm, g = _filled(cfg, 1, 1, 4, [20], 0.0, 0)
    for name in ("spectral", "reconstruct"):
        strat = ATTENTION_STRATEGIES[name](cfg, tm.key_compressor, tm.value_compressor)
        view = tm.view()
        mask = torch.zeros(1, 1, 2, view.exact_k.shape[2], dtype=torch.bool)
        cold_valid = torch.zeros(1, view.n_cold_blocks, dtype=torch.bool)
        out = strat.attend(torch.randn(1, 1, 2, 4), dataclasses.replace(view, exact_mask=mask, cold_valid=cold_valid), 0.5)
        assert torch.equal(out, torch.zeros_like(out))


@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 2), group=st.integers(1, 3), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3), seed=st.integers(0, 10**6))
@settings(max_examples=25)  # each example runs the Triton interpreter (~0.5 s)
def test_fused_decode_strategy_equals_spectral(batch, kv_heads, group, sizes, seed):
    """The `fused` strategy's kernel path (TRITON_INTERPRET on CPU) against the torch math."""
    import os

    from spectral_kv.kernels.fused_decode import HAS_TRITON

    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton's CPU interpreter (the GPU path is checked by tests/gpu/spectral_gpu.py)")
    d = 16
    cfg = SpectralConfig.preset("fast", block_size=16, k_rank_keys=4, k_rank_values=6, hot_buffer_size=2, sink_tokens=1)
    tm, g = _filled(cfg, batch, kv_heads, d, sizes, 0.0, seed)
    q = torch.randn(batch, kv_heads * group, 1, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, 1, d, generator=g), torch.randn(batch, kv_heads, 1, d, generator=g)
    fused = ATTENTION_STRATEGIES["fused"](cfg, tm.key_compressor, tm.value_compressor)
    view = tm.view(nk, nv)
    assert view.exact_mask is None  # unpadded decode step: every exact token is visible
    out = fused.attend(q, view, d**-0.5)
    assert fused.kernel_calls == 1
    ref = _attend("spectral", cfg, tm, q, nk, nv, d**-0.5)
    # The kernel rounds p to fp16 for the p @ C_v dot (documented, ~1e-3 relative): compare norms.
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 2e-3, rel
