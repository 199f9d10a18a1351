"""Byte value statistics (``value_stats="byte"``) end to end: what the compressors store and
decode, the torch strategies and the fused quantized decode kernel serving them, bytes reported
== bytes held (save/load: test_persist.py). The math of the form is in test_quant.py,
the compress kernel in test_kernels_quant_compress.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectral_kv import ATTENTION_STRATEGIES, SpectralConfig, TierManager
from spectral_kv.compressors import COMPRESSORS
from spectral_kv.memory import SHAPES, measure_memory
from spectral_kv.quant import group_stats

VALUES = {  # values compressor -> the config fields it needs (keys: hadamard 4-bit)
    "hadamard": dict(),
    "kivi2": dict(value_compressor="kivi2"),
    "spectral_quant": dict(value_compressor="spectral_quant", value_segments=((8, 4), (8, 2))),
}


def _cfg(values, stats, **kw):
    return SpectralConfig(block_size=16, hot_buffer_size=2, sink_tokens=1, quant_group=8, value_stats=stats,
                          verbose=False, **VALUES[values], **kw)


def _filled(cfg, batch, h, d, sizes, pad_p, seed):
    g = torch.Generator().manual_seed(seed)
    tm = TierManager(cfg)
    for t in sizes:
        tm.append(torch.randn(batch, h, t, d, generator=g), torch.randn(batch, h, t, d, generator=g),
                  torch.rand(batch, t, generator=g) >= pad_p)
    return tm, g


@pytest.mark.parametrize("values", sorted(VALUES))
def test_values_store_two_bytes_of_statistics_and_keys_are_untouched(values):
    """Same codes budget, 2 bytes instead of 4 per token and segment; the keys' parts are bit
    for bit those of the float16 config; the decoded values keep the half-step bound."""
    d, t = 32, 16
    byte, fp16 = _cfg(values, "byte"), _cfg(values, "fp16")
    x = torch.randn(3, t, d, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, d)
    shared = None
    vc = COMPRESSORS[byte.compressor_name("values")](byte, "values", 0)
    vf = COMPRESSORS[fp16.compressor_name("values")](fp16, "values", 0)
    if vc.shared_specs(d):
        shared = {n: s.reshape(3, *s.shape[2:]) for n, s in vc.fit(x[None]).items()}
    pb = vc.compress(x, shared) if shared else vc.compress(x)
    pf = vf.compress(x, shared) if shared else vf.compress(x)
    assert (pb["scale"].dtype, pb["zero"].dtype) == (torch.uint8, torch.int8)
    assert (pf["scale"].dtype, pf["zero"].dtype) == (torch.float16, torch.float16)
    assert pb["scale"].shape == pf["scale"].shape and pb["codes"].shape == pf["codes"].shape
    held = lambda p: sum(v.numel() * v.element_size() for v in p.values())  # noqa: E731
    assert held(pf) - held(pb) == 2 * pb["scale"].numel()
    assert vc.part_specs(d) == {n: (tuple(v.shape[1:]), v.dtype) for n, v in pb.items()}
    # the half-step bound in the compressor's own basis
    c = vc.coefficients(pb, shared) if shared else vc.coefficients(pb)
    s, _ = group_stats(pb["scale"], pb["zero"])
    width = c.shape[-1] // s.shape[-1] if values != "spectral_quant" else None
    step = s.repeat_interleave(width, -1) if width else torch.cat([s[..., i:i + 1].expand(*s.shape[:-1], ch)
                                                                    for i, (ch, _) in enumerate(vc.layout(d).kept_segments)], -1)
    exact = x @ vc.shared_basis(pb, shared).transpose(-1, -2)  # [3, T, kept]: [D, D] rotation or per-row basis rows
    assert ((c - exact).abs() <= step / 2 * (1 + 1e-5) + 1e-5).all()
    kb, kf = (COMPRESSORS[cfg.compressor_name("keys")](cfg, "keys", 0) for cfg in (byte, fp16))
    assert all(torch.equal(a, b) for a, b in zip(kb.compress(x).values(), kf.compress(x).values()))


@given(values=st.sampled_from(sorted(VALUES)), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
       group=st.integers(1, 3), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), tq=st.integers(1, 3),
       pad_p=st.floats(0, 0.3), seed=st.integers(0, 10**6))
@settings(max_examples=30)
def test_spectral_equals_reconstruct_on_byte_statistics(values, batch, kv_heads, group, sizes, tq, pad_p, seed):
    d = 16
    cfg = _cfg(values, "byte")
    tm, g = _filled(cfg, batch, kv_heads, d, sizes, pad_p, seed)
    q = torch.randn(batch, kv_heads * group, tq, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, tq, d, generator=g), torch.randn(batch, kv_heads, tq, d, generator=g)
    out = {}
    for name in ("spectral", "reconstruct"):
        strat = ATTENTION_STRATEGIES[name](cfg, tm.key_compressor, tm.value_compressor)
        out[name] = strat.attend(q, tm.view(nk, nv), d**-0.5)
    assert torch.isfinite(out["spectral"]).all()
    assert torch.allclose(out["spectral"], out["reconstruct"], atol=2e-5, rtol=1e-4)


@given(values=st.sampled_from(sorted(VALUES)), batch=st.integers(1, 2), kv_heads=st.integers(1, 2),
       group=st.integers(1, 3), sizes=st.lists(st.integers(1, 60), min_size=1, max_size=3), seed=st.integers(0, 10**6))
@settings(max_examples=12)  # each example runs the Triton interpreter
def test_fused_quantized_decode_reads_byte_statistics_as_spectral_does(values, batch, kv_heads, group, sizes, seed):
    """The `fused` strategy's kernel path (TRITON_INTERPRET on CPU) against the torch math, on
    byte value statistics: the kernel runs (no fallback) and agrees within its fp16 rounding."""
    import os

    from spectral_kv.kernels.quant_decode import HAS_TRITON

    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs triton's CPU interpreter")
    d = 16
    cfg = _cfg(values, "byte")
    tm, g = _filled(cfg, batch, kv_heads, d, sizes, 0.0, seed)
    q = torch.randn(batch, kv_heads * group, 1, d, generator=g)
    nk, nv = torch.randn(batch, kv_heads, 1, d, generator=g), torch.randn(batch, kv_heads, 1, d, generator=g)
    fused = ATTENTION_STRATEGIES["fused"](cfg, tm.key_compressor, tm.value_compressor)
    assert fused.kernel == "quant"
    out = fused.attend(q, tm.view(nk, nv), d**-0.5)
    assert (fused.kernel_calls, fused.fallback_calls) == (1, 0)
    ref = ATTENTION_STRATEGIES["spectral"](cfg, tm.key_compressor, tm.value_compressor).attend(q, tm.view(nk, nv), d**-0.5)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 3e-3, rel


def test_quant_decode_reference_reads_byte_statistics_as_their_float_values():
    """The kernel's twin: byte statistics give the same attention as float32 statistics of
    the same values (`group_stats`), and a NaN scale code reaches the output (not hidden)."""
    from spectral_kv.attention.quant_fused import _flat
    from spectral_kv.kernels.quant_decode import quant_decode_reference

    cfg = _cfg("hadamard", "byte")
    tm, g = _filled(cfg, 1, 2, 16, [60], 0.0, 3)
    kc, vc = tm.key_compressor, tm.value_compressor
    view = tm.view(torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g))
    n_cold, n_exact = view.counts()
    ck, cv = view.cold_k, view.cold_v
    q = torch.randn(1, 4, 16, generator=g)
    kl, vl = kc.code_layout(16), vc.code_layout(16)
    # identity bases (None): the op's output columns are the value codes' channels
    args = lambda vs, vz: (q, None, None, ck["codes"], ck["scale"], ck["zero"], cv["codes"], vs, vz,  # noqa: E731
                           n_cold.int(), view.exact_k, view.exact_v, n_exact.int(), 0.25, _flat(kl), _flat(vl),
                           16 // ck["scale"].shape[3])
    s, z = group_stats(cv["scale"], cv["zero"])
    byte = quant_decode_reference(*args(cv["scale"], cv["zero"]))
    # float32 statistics are outside the op's contract; float16 ones are exact here when they represent s and z
    assert torch.equal(s.half().float(), s) and torch.equal(z.half().float(), z)
    fp16 = quant_decode_reference(*args(s.half(), z.half()))
    assert torch.equal(byte, fp16)
    nan = cv["scale"].clone()
    nan[0, 0, 0, 5, 0] = 255
    out = quant_decode_reference(*args(nan, cv["zero"]))  # [B, Hq, D]: KV head 0, segment 0 = channels 0..7
    assert torch.isnan(out[0, :2, :8]).all() and torch.isfinite(out[0, :2, 8:]).all() and torch.isfinite(out[0, 2:]).all()
    # ...and the kernel against its twin (the interpreter), NaN code included
    import os

    from spectral_kv.kernels.quant_decode import HAS_TRITON, quant_decode

    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        for vs in (cv["scale"], nan):
            got = quant_decode(*args(vs, cv["zero"]), operands="fp32")
            want = quant_decode_reference(*args(vs, cv["zero"]))
            assert torch.equal(torch.isnan(got), torch.isnan(want))
            assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=1e-5, rtol=1e-4)


@given(values=st.sampled_from(sorted(VALUES)), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6),
       batch=st.integers(1, 3), pad_p=st.floats(0, 0.4), seed=st.integers(0, 1000))
@settings(max_examples=30)
def test_reported_bytes_equal_bytes_held_with_byte_statistics(values, sizes, batch, pad_p, seed):
    cfg = _cfg(values, "byte")
    tm, _ = _filled(cfg, batch, 2, 16, sizes, pad_p, seed)
    held = sum(t.numel() * t.element_size() for t in tm.held_tensors())
    rep = tm.memory_report()
    assert rep["total_bytes"] == held
    if tm.cold.tensors():  # 2 bytes of value statistics per cold token per segment, not 4
        scale = tm.cold_v.parts["scale"]
        assert scale.dtype == torch.uint8 and tm.cold_v.parts["zero"].dtype == torch.int8


def test_memory_table_gains_exactly_the_statistics_bytes():
    """SmolLM2's shape (head_dim 64, 3-bit values in one 64-channel segment): byte statistics
    save 2 bytes per cold token per KV head and layer; measure_memory asserts reported == held."""
    shape, ctx = SHAPES["smollm2"], 4096
    fp16, byte = (measure_memory(shape, (ctx,), SpectralConfig.preset("compact", verbose=False, value_stats=s))[0]
                  for s in ("fp16", "byte"))
    cold_tokens = (ctx - 4 - 256) // 512 * 512
    saved = 2 * cold_tokens * shape.kv_heads * shape.layers
    assert round((fp16["spectral_mb"] - byte["spectral_mb"]) * 2**20) == saved
    assert byte["ratio"] > fp16["ratio"]
