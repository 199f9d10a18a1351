"""The learned-basis compressor (`spectral_quant`), the bit allocator and the no-silent-ignore rule."""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from spectral_kv import SpectralConfig
from spectral_kv.allocate import allocate, merge_segments, segment_cost
from spectral_kv.compressors import COMPRESSORS
from spectral_kv.compressors.spectral_quant import pca_basis
from spectral_kv.config import LAYOUT_FIELDS
from spectral_kv.presets import design_call_fields


def _kv(n, t, d, seed, decay=0.85):
    """Blocks with a decaying spectrum, a mean and an outlier channel (like real keys)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    x = torch.randn(n, t, d, generator=g) * decay ** torch.arange(d) @ mix.T
    return x + 0.5 * torch.randn(d, generator=g) + 3.0 * (torch.arange(d) == 1)


def _comp(role, **fields):
    cfg = SpectralConfig(compressor="spectral_quant", block_size=fields.pop("block_size", 32), hot_buffer_size=2,
                         quant_group=fields.pop("quant_group", 16), basis_dtype=fields.pop("basis_dtype", "float32"), **fields)
    return COMPRESSORS["spectral_quant"](cfg, role, cfg.rank(role))


def _fit(comp, x):
    """Fit one row's basis on all of ``x`` [N, T, D]; every block gets that row's basis."""
    basis = comp.fit(x.reshape(1, 1, -1, x.shape[-1]))["basis"]
    return {"basis": basis.reshape(1, *basis.shape[2:]).expand(x.shape[0], *basis.shape[2:])}


def _err2(comp, x, shared):
    return float(((comp.decompress(comp.compress(x, shared), torch.float64, shared) - x.double()) ** 2).sum())


# --------------------------------------------------------------------------- basis
@given(d=st.sampled_from([4, 16, 24]), seed=st.integers(0, 10**6))
def test_pca_basis_is_orthonormal_and_ordered_by_energy(d, seed):
    x = _kv(3, 20, d, seed)
    b = pca_basis(x)
    assert torch.allclose(b @ b.transpose(-1, -2), torch.eye(d).expand(3, d, d), atol=1e-5)
    energy = ((x @ b.transpose(-1, -2)) ** 2).sum(-2)  # [3, d]
    assert (energy[:, :-1] >= energy[:, 1:] * (1 - 1e-4) - 1e-5).all()


# --------------------------------------------------------------------------- allocator
@given(role=st.sampled_from(["keys", "values"]), budget=st.floats(0.0, 8.0), seed=st.integers(0, 10**6))
def test_error_equals_the_allocators_prediction(role, budget, seed):
    """Segments quantize independently in an orthonormal basis: the measured table predicts the error."""
    x = _kv(2, 32, 64, seed)
    probe = _comp(role)
    shared = _fit(probe, x)
    dist = probe.measure_distortion(x, shared)
    segs = allocate(dist, [16] * 4, budget, segment_overhead=32 if role == "values" else 0)
    assert segment_cost(segs, 32 if role == "values" else 0) <= budget * 64 + 1e-6
    assert [b for _, b in segs] == sorted((b for _, b in segs), reverse=True)
    assume(any(b for _, b in segs))
    comp = _comp(role, **{"key_segments" if role == "keys" else "value_segments": segs})
    predicted = sum(dist[u][b] for u, (_, b) in enumerate(segs))
    assert _err2(comp, x, shared) == pytest.approx(predicted, rel=1e-3, abs=1e-6 * float((x**2).sum()))


@given(role=st.sampled_from(["keys", "values"]), seed=st.integers(0, 10**6), merge=st.booleans())
def test_error_never_rises_with_budget(role, seed, merge):
    x = _kv(2, 32, 64, seed)
    probe = _comp(role)
    dist = probe.measure_distortion(x, _fit(probe, x))
    over = 32 if role == "values" else 0
    errs = []
    for budget in [0.25 * i for i in range(0, 33)]:
        segs = allocate(dist, [16] * 4, budget, segment_overhead=over, merge=merge)
        assert segment_cost(segs, over) <= budget * 64 + 1e-6
        unit = [b for c, b in segs for _ in range(c // 16)]
        errs.append(sum(dist[u][b] for u, b in enumerate(unit)))
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errs, errs[1:])), errs


def test_allocate_validates_and_merges():
    with pytest.raises(ValueError, match="budget"):
        allocate([[1.0] * 9], [16], -1.0)
    with pytest.raises(ValueError, match="rows"):
        allocate([[1.0] * 9], [16, 16], 2.0)
    assert merge_segments(((16, 4), (16, 4), (32, 0))) == ((32, 4), (32, 0))
    # a unit worth nothing gets nothing; one worth a lot gets the bits
    assert allocate([[100.0] + [100.0 / 4**b for b in range(1, 9)], [0.0] * 9], [16, 16], 4.0) == ((16, 8), (16, 0))


# --------------------------------------------------------------------------- lossless, bounds, bytes
@given(role=st.sampled_from(["keys", "values"]), d=st.sampled_from([8, 16, 24]), seed=st.integers(0, 10**6))
def test_unquantized_full_rank_is_exact(role, d, seed):
    x = _kv(3, 32, d, seed)
    comp = _comp(role, coeff_bits=None, value_bits="same")
    shared = _fit(comp, x)
    parts = comp.compress(x, shared)
    assert set(parts) == {"coeffs"}
    assert torch.allclose(comp.decompress(parts, torch.float32, shared), x, atol=1e-4)


@given(role=st.sampled_from(["keys", "values"]), bits=st.integers(1, 8), seed=st.integers(0, 10**6))
def test_quantization_error_within_half_a_scale(role, bits, seed):
    x = _kv(2, 32, 16, seed)
    comp = _comp(role, coeff_bits=bits, value_bits="same")
    shared = _fit(comp, x)
    parts = comp.compress(x, shared)
    exact = x @ shared["basis"].float().transpose(-1, -2)
    err = (comp.coefficients(parts, shared) - exact).abs()
    scale = parts["scale"].float()
    bound = scale.repeat_interleave(16, dim=-2) if role == "keys" else scale.repeat_interleave(16, dim=-1)
    assert (err <= bound / 2 * (1 + 2e-3) + 1e-3 * exact.abs().amax()).all()


@given(role=st.sampled_from(["keys", "values"]), seed=st.integers(0, 1000),
       segs=st.sampled_from([((16, 6), (16, 4), (32, 2)), ((16, 8), (48, 0)), ((32, 3), (16, 1)), ((16, 7), (16, 5), (16, 3), (16, 1))]),
       rank=st.sampled_from([None, 16, 40]), basis_dtype=st.sampled_from(["float16", "float32"]))
def test_bytes_reported_equal_bytes_held_and_spectral_equals_reconstruct(role, seed, segs, rank, basis_dtype):
    field = "key_segments" if role == "keys" else "value_segments"
    comp = _comp(role, **{field: segs, ("k_rank_keys" if role == "keys" else "k_rank_values"): rank}, basis_dtype=basis_dtype)
    x = _kv(3, 32, 64, seed)
    shared = _fit(comp, x)
    specs, sspecs = comp.part_specs(64), comp.shared_specs(64)
    assert {k: (tuple(v.shape[2:]), v.dtype) for k, v in comp.fit(x.reshape(1, 1, -1, 64)).items()} == sspecs
    parts = comp.compress(x, shared)
    assert {k: (tuple(v.shape[1:]), v.dtype) for k, v in parts.items()} == specs
    layout = comp.layout(64)
    kept = min(sum(c for c, b in segs if b), rank or 64)
    assert layout.kept == kept and parts["codes"].shape[-1] == layout.nbytes == sum(32 * c * b // 8 for c, b in layout.kept_segments)
    # the factored math the spectral strategy uses == attention over the reconstruction
    g = torch.Generator().manual_seed(seed)
    q, p = torch.randn(3, 2, 64, generator=g), torch.softmax(torch.randn(3, 2, 32, generator=g), -1)
    coeffs, basis = comp.coefficients(parts, shared), comp.basis(parts, shared)
    dense = comp.decompress(parts, torch.float32, shared)
    assert torch.allclose((q @ basis.transpose(-1, -2)) @ coeffs.transpose(-1, -2), q @ dense.transpose(-1, -2), atol=1e-3)
    assert torch.allclose((p @ coeffs) @ basis, p @ dense, atol=1e-4)
    # per-row shared tensors broadcast over a row's blocks like gathered ones
    rows = {"basis": shared["basis"][:1]}
    blocks = {k: v.unsqueeze(0) for k, v in parts.items()}
    assert torch.allclose(comp.decompress(blocks, torch.float32, rows)[0], dense)
    assert torch.equal(comp.shared_basis(parts, shared), basis)


def test_compress_refuses_a_missing_basis():
    comp = _comp("keys")
    with pytest.raises(ValueError, match="fitted basis"):
        comp.compress(torch.randn(1, 32, 16))
    with pytest.raises(ValueError, match="non-finite"):
        comp.fit(torch.full((1, 1, 32, 16), float("nan")))


# --------------------------------------------------------------------------- config fields
@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(key_segments=((16, 4), (16, 6))), "key_segments=.*must not increase"),
        (dict(value_segments=((16, 9),)), "value_segments=.*bits must be ints in 0..8"),
        (dict(key_segments=((0, 4),)), "key_segments=.*channels must be positive"),
        (dict(key_segments="16x4"), "key_segments must be a non-empty tuple"),
        (dict(value_segments=((16, 4, 1),)), "value_segments=.*pair"),
        (dict(block_size=20, hot_buffer_size=2, quant_group=4, key_segments=((16, 3),)), "block_size=20"),
        (dict(k_rank_keys=0), "k_rank_keys must be a positive int"),
        (dict(key_segments=((16, 4),), coeff_bits=2), "coeff_bits=2 has no effect"),
        (dict(value_segments=((16, 4),), value_bits=2), "value_bits=2 has no effect"),
        (dict(seed=3), "seed=3 has no effect under the layout keys='spectral_quant'"),
    ],
)
def test_invalid_fields_raise_naming_them(fields, match):
    with pytest.raises(ValueError, match=match):
        SpectralConfig(compressor="spectral_quant", **fields)


def test_segments_wider_than_the_head_are_refused_against_the_model():
    cfg = SpectralConfig(compressor="spectral_quant", key_segments=((48, 4), (32, 2)))
    with pytest.raises(ValueError, match="key_segments=.*80 channels, more than head_dim=64"):
        cfg.check_head_dim(64)
    cfg.check_head_dim(128)
    assert SpectralConfig(compressor="spectral_quant", value_segments=[[16, 4], [16, 2]]).value_segments == ((16, 4), (16, 2))


SAMPLES = dict(k_rank_keys=16, k_rank_values=16, coeff_bits=8, value_bits=8, quant_group=64, basis_dtype="float32",
               seed=3, rsvd_oversample=4, rsvd_power_iters=1, key_segments=((16, 4),), value_segments=((16, 4),),
               value_stats="byte")


@pytest.mark.parametrize("name", COMPRESSORS.names())
@pytest.mark.parametrize("field", LAYOUT_FIELDS)
def test_a_field_the_layout_does_not_read_raises(name, field):
    """Every layout field x every built-in compressor: set alone, it raises unless the compressor reads it."""
    if name.startswith("test_"):
        pytest.skip("a compressor registered by another test")
    cls = COMPRESSORS[name]
    base = dict(compressor=name, use_spectral_attention=cls.low_rank)
    if "rank" in (cls.config_fields or ()) and name != "spectral_quant":
        base.update(k_rank_keys=16, k_rank_values=16, value_bits="same")
    cfg_fields = {**base, field: SAMPLES[field]}
    read = cls.reads(SpectralConfig(**base), "keys") | cls.reads(SpectralConfig(**base), "values")
    if field in read:
        SpectralConfig(**cfg_fields)  # accepted
    else:
        with pytest.raises(ValueError, match=f"{field}=.* has no effect under the layout keys='{name}'"):
            SpectralConfig(**cfg_fields)


def test_original_design_call_selects_the_low_rank_spectral_layout():
    fields = design_call_fields(dict(block_size=512, k_rank_keys=16, k_rank_values=32, hot_buffer_size=64), {}, base_given=False)
    cfg = SpectralConfig().replace(**fields)
    assert (cfg.compressor, cfg.k_rank_keys, cfg.k_rank_values) == ("spectral_quant", 16, 32)
    k = COMPRESSORS["spectral_quant"](cfg, "keys", 16)
    assert k.layout(64).kept == 16 and COMPRESSORS["spectral_quant"](cfg, "values", 32).layout(64).kept == 32
    # a compressor, preset or config given: the ranks go to it (and raise if it has none)
    assert design_call_fields(dict(k_rank_keys=16), {"compressor": "exact_svd"}, base_given=False) == {"k_rank_keys": 16, "compressor": "exact_svd"}
    assert "compressor" not in design_call_fields(dict(k_rank_keys=16), {}, base_given=True)
    assert "compressor" not in design_call_fields(dict(block_size=256), {}, base_given=False)


@pytest.mark.parametrize("name", ["spectral-5x", "spectral-8x"])
def test_candidate_presets_are_valid_learned_basis_layouts(name):
    cfg = SpectralConfig.preset(name)
    assert cfg.compressor == "spectral_quant" and cfg.key_segments is not None
    cfg.check_head_dim(64)
    from spectral_kv.eval.tune import block_bytes

    ratio = block_bytes(cfg, 64, 6)["ratio"]  # 3.5K context: 6 cold blocks share the row's basis
    assert ratio >= (5.0 if name == "spectral-5x" else 8.0)
