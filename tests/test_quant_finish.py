"""The Gluon path of `quant_decode` without a GPU (`kernels/quant_decode_gluon_path.py`).

Gluon has no interpreter, so the cold partials come from their torch twin
(`quant_decode_gluon.cold_partials_reference`, itself checked in test_quant_gluon.py) and the
finish kernel (`kernels/quant_finish_triton.py`: exact tail, joint merge, value rotation, cast)
runs under TRITON_INTERPRET=1; both it and its twin must reproduce `quant_decode_reference`.
Then the backend selection: what `gluon_serves` refuses, and that "auto" picks the `tl` kernel on
CPU while a forced "gluon" raises naming why. The GPU check is `benchmarks/quant_decode_bench.py`.
"""

import types

import pytest
import torch

from spectral_kv.codes import CodeLayout
from spectral_kv.kernels import quant_decode_gluon as QG
from spectral_kv.kernels import quant_decode_gluon_path as GP
from spectral_kv.kernels.quant_decode import HAS_TRITON, quant_decode, quant_decode_reference
from spectral_kv.quant import BYTE_SCALE_NAN, byte_scale_code

from test_kernels_quant import make

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")


def _partials(args, tps):
    """The Gluon kernel's partials (its torch twin) for the op arguments ``args``."""
    q, rk, rv, kc, ks, kz, vc, vs, vz, nc, ek, ev, ne, scaling, kflat, vflat, kg = args
    T = vs.shape[3]
    kl, vl = CodeLayout(T, tuple(zip(kflat[0::2], kflat[1::2]))), CodeLayout(T, tuple(zip(vflat[0::2], vflat[1::2])))
    qk = GP.query_in_key_basis(q, rk, kl.kept)
    return QG.cold_partials_reference(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps)


CASES = {  # B, H, G, D, NB, T, key layout, value layout, key group, Te, n_cold, n_exact, basis, tps
    "hd64-g4-shared": (2, 2, 4, 64, 3, 128, ((64, 4),), ((64, 3),), 64, 5, [3, 1], [5, 2], "shared", 1),
    "hd128-g1-head": (2, 1, 1, 128, 2, 128, ((128, 3),), ((128, 2),), 32, 70, [2, 1], [70, 64], "head", 2),
    "hd64-g3-identity": (2, 2, 3, 64, 2, 256, ((64, 8),), ((64, 4),), 128, 9, [1, 2], [0, 9], "identity", 3),
    "hd128-g8-row": (1, 2, 8, 128, 2, 128, ((128, 4),), ((128, 4),), 16, 3, [2], [3], "row", 1),
    "no-cold-g4": (2, 1, 4, 64, 2, 128, ((64, 4),), ((64, 2),), 64, 6, [0, 0], [6, 1], "shared", 1),
    "empty-exact-g8": (2, 1, 8, 64, 2, 128, ((64, 2),), ((64, 2),), 32, 0, [2, 1], [0, 0], "head", 2),
    "no-token-row": (2, 1, 4, 64, 1, 128, ((64, 4),), ((64, 3),), 64, 4, [1, 0], [4, 0], "identity", 1),
    "kept<D-identity": (1, 2, 4, 128, 1, 128, ((64, 4), (64, 0)), ((64, 3), (64, 0)), 64, 5, [1], [5], "identity", 1),
    "kept<D-shared": (1, 2, 4, 128, 1, 128, ((64, 4), (64, 0)), ((64, 3), (64, 0)), 64, 5, [1], [5], "shared", 1),
    # more (split, head) rows than one merge step reads (RB = 64 with a 64-wide basis, 128 for the
    # identity): the online max carries across steps, and a step boundary cuts through a split's G rows
    "many-splits-g3-shared": (2, 2, 3, 64, 24, 128, ((64, 4),), ((64, 2),), 64, 5, [24, 13], [5, 2], "shared", 1),
    "many-splits-g3-identity": (2, 2, 3, 64, 24, 128, ((64, 4),), ((64, 2),), 64, 5, [24, 7], [5, 0], "identity", 1),
}


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_finish_kernel_on_twin_partials_matches_the_reference(case):
    B, H, G, D, NB, T, kseg, vseg, kg, Te, nc, ne, basis, tps = CASES[case]
    args, _ = make(B, H, G, D, NB, T, kseg, vseg, kg, Te, nc, ne, seed=len(case), basis=basis)
    q, rv, ek, ev, n_exact, scaling = args[0], args[2], args[10], args[11], args[12], args[13]
    m, l, acc = _partials(args, tps)
    assert m.shape[2] == -(-(NB * QG.unit_plan(CodeLayout(T, kseg), CodeLayout(T, vseg))[2]) // tps)
    want = quant_decode_reference(*args)
    twin = GP.finish_reference(q, rv, m, l, acc, ek, ev, n_exact, scaling)
    out = GP.finish(q, rv, m, l, acc, ek, ev, n_exact, scaling)
    assert out.shape == want.shape and out.dtype == want.dtype
    assert torch.isfinite(out).all()
    assert torch.allclose(twin, want, atol=1e-5, rtol=1e-4), (twin - want).abs().max()
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), (out - want).abs().max()
    for b in range(B):  # a row with no token at all is zeros, not NaN
        if nc[b] == 0 and ne[b] == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@needs_triton
def test_finish_output_in_the_query_dtype_and_no_split():
    # bf16 model: cast once at the store; NB = 0 (S = 0): the exact tail alone
    args, _ = make(2, 1, 4, 64, 0, 128, ((64, 4),), ((64, 3),), 64, 7, [0, 0], [7, 3], seed=3, poison=False)
    low = (args[0].bfloat16(),) + args[1:10] + (args[10].bfloat16(), args[11].bfloat16()) + args[12:]
    m, l, acc = _partials(low, 1)
    assert m.shape[2] == 0
    out, want = GP.finish(low[0], low[2], m, l, acc, *low[10:14]), quant_decode_reference(*low)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    with pytest.raises(ValueError, match="m/l/acc shaped"):
        GP.finish(low[0], low[2], m[:, :, :, :2], l, acc, *low[10:14])


def _cuda_query(B, Hq, D):
    # gluon_serves reads only the query's device and shape: a stand-in "on CUDA" reaches the
    # layout-level reasons on a machine without a GPU
    return types.SimpleNamespace(is_cuda=True, shape=(B, Hq, D), device=torch.device("cuda"))


def _serves(kseg, vseg, G=4, kg=128, T=512, vstats=torch.float16, **kw):
    kl, vl = CodeLayout(T, kseg), CodeLayout(T, vseg)
    ks = torch.zeros(1, 2, 1, T // kg, kl.kept, dtype=torch.float16)
    vs = torch.zeros(1, 2, 1, T, len(vl.kept_segments), dtype=vstats)
    kc, vc = torch.zeros(1, 2, 1, kl.nbytes, dtype=torch.uint8), torch.zeros(1, 2, 1, vl.nbytes, dtype=torch.uint8)
    return GP.gluon_serves(_cuda_query(1, 2 * G, 128), kc, ks, vc, vs, kl, vl, kg, **kw)


@pytest.mark.skipif(not QG.HAS_GLUON or not HAS_TRITON, reason="gluon (triton >= 3.6) not importable")
def test_gluon_serves_names_what_it_does_not_take():
    bal = (((128, 4),), ((128, 3),))
    assert _serves(*bal) == (True, "")
    assert _serves(((128, 3),), ((128, 2),), G=8) == (True, "")
    assert _serves(*bal, vstats=torch.uint8) == (True, "")  # value_stats="byte": the kernel's VBYTE variant
    for kw, why in [(dict(kseg=((64, 4), (64, 2)), vseg=bal[1]), "one segment"),
                    (dict(kseg=bal[0], vseg=((32, 4),) * 4), "one segment"),
                    (dict(kseg=bal[0], vseg=((128, 5),)), "width"),
                    (dict(kseg=((96, 4), (32, 0)), vseg=bal[1]), "keeps 96"),
                    (dict(kseg=bal[0], vseg=bal[1], G=16), "G=16"),
                    (dict(kseg=bal[0], vseg=bal[1], kg=8), "key_group=8"),
                    (dict(kseg=bal[0], vseg=bal[1], operands="fp32"), "operands='fp32'"),
                    (dict(kseg=bal[0], vseg=bal[1], unpack="triton"), "unpack='triton'"),
                    (dict(kseg=bal[0], vseg=bal[1], block_rows=32), "block_rows=32"),
                    (dict(kseg=bal[0], vseg=bal[1], interpreted=True), "TRITON_INTERPRET"),
                    (dict(kseg=bal[0], vseg=bal[1], vstats=torch.uint8, G=16), "G=16"),
                    (dict(kseg=bal[0], vseg=((128, 5),), vstats=torch.uint8), "width")]:
        ok, reason = _serves(**kw)
        assert not ok and why in reason, (kw, reason)


@needs_triton
def test_backend_auto_is_triton_on_cpu_and_forced_gluon_raises():
    args, _ = make(1, 1, 4, 64, 1, 128, ((64, 4),), ((64, 3),), 64, 3, [1], [3], seed=5)
    kl, vl = CodeLayout(128, ((64, 4),)), CodeLayout(128, ((64, 3),))
    ok, why = GP.gluon_serves(args[0], args[3], args[4], args[6], args[7], kl, vl, 64)
    assert not ok and ("CUDA" in why or "gluon" in why), why
    auto, tl_ = quant_decode(*args), quant_decode(*args, backend="triton")
    assert torch.equal(auto, tl_)  # by design: the tl kernel serves where Gluon cannot
    assert torch.allclose(auto, quant_decode_reference(*args), atol=2e-2, rtol=2e-2)
    err = ValueError if QG.HAS_GLUON else RuntimeError
    with pytest.raises(err, match="backend='gluon' cannot serve this call: .*(CUDA|gluon)"):
        quant_decode(*args, backend="gluon")
    multi, _ = make(1, 1, 4, 64, 1, 16, ((32, 4), (32, 2)), ((64, 3),), 16, 3, [1], [3], seed=6)
    with pytest.raises(err, match="backend='gluon' cannot serve"):
        quant_decode(*multi, backend="gluon")
    with pytest.raises(ValueError, match="backend='cuda'"):
        quant_decode(*args, backend="cuda")


@needs_triton
@pytest.mark.parametrize("basis", ["identity", "shared", "head", "row"])
def test_gluon_path_host_code_with_the_twin_for_the_gluon_kernel(basis, monkeypatch):
    # The whole path through the op (custom_op, gluon_serves said yes, query rotation, split plan,
    # finish kernel) with only the Gluon launch replaced by its torch twin; cold_blocks plans for
    # fewer blocks than the pools hold and the spare slots' splits must still come out empty.
    calls = []

    def twin(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps=0, max_registers=0):
        calls.append((tuple(qk.shape), qk.dtype, tps))
        return (*QG.cold_partials_reference(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps), tps)

    monkeypatch.setattr(GP.QG, "cold_partials", twin)
    monkeypatch.setattr(GP, "gluon_serves", lambda *a, **k: (True, ""))
    args, _ = make(3, 2, 4, 64, 4, 128, ((64, 4),), ((64, 3),), 64, 6, [4, 1, 0], [6, 0, 3], seed=7, basis=basis)
    want = quant_decode_reference(*args)
    for knobs in (dict(), dict(cold_blocks=1), dict(tiles_per_split=3)):
        out = quant_decode(*args, backend="gluon", **knobs)
        assert calls[-1][:2] == ((3, 8, 64), torch.float32), calls[-1]
        assert out.dtype == want.dtype and torch.allclose(out, want, atol=1e-4, rtol=1e-4), (knobs, (out - want).abs().max())
    assert calls[-1][2] == 3 and len({c[2] for c in calls}) > 1  # the knob reached the Gluon launch; plans differ
    noblocks, _ = make(2, 1, 4, 64, 0, 128, ((64, 4),), ((64, 3),), 64, 5, [0, 0], [5, 2], seed=8, basis=basis)
    n = len(calls)
    out = quant_decode(*noblocks, backend="gluon")
    assert len(calls) == n  # NB = 0: no Gluon launch, the finish kernel alone
    assert torch.allclose(out, quant_decode_reference(*noblocks), atol=1e-4, rtol=1e-4)


@needs_triton
def test_gluon_path_passes_byte_value_statistics_to_the_gluon_kernel(monkeypatch):
    # value_stats="byte" on the Gluon path: the uint8 scale codes / int8 zero points reach the Gluon
    # launch as they are (its twin decodes them), the finish kernel merges, and the result is the op's
    # reference on the byte form; NaN codes past the counts never reach it
    seen = []

    def twin(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps=0, max_registers=0):
        seen.append((vs.dtype, vz.dtype))
        return (*QG.cold_partials_reference(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps), tps)

    monkeypatch.setattr(GP.QG, "cold_partials", twin)
    monkeypatch.setattr(GP, "gluon_serves", lambda *a, **k: (True, ""))
    args, _ = make(2, 2, 4, 64, 3, 128, ((64, 4),), ((64, 3),), 64, 6, [3, 1], [6, 2], seed=9, basis="shared")
    g = torch.Generator().manual_seed(9)
    code = byte_scale_code(torch.rand(args[7].shape, generator=g) * 0.3 + 0.02)
    zp = torch.randint(-128, 128, args[7].shape, generator=g, dtype=torch.int8)
    code[1, :, 1:] = BYTE_SCALE_NAN
    byte = args[:7] + (code, zp) + args[9:]
    want = quant_decode_reference(*byte)
    out = quant_decode(*byte, backend="gluon")
    assert seen == [(torch.uint8, torch.int8)]
    assert torch.isfinite(want).all() and out.dtype == want.dtype
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4), (out - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_query_in_key_basis_every_basis_form(dtype):
    g = torch.Generator().manual_seed(1)
    B, H, G, D, dk = 2, 3, 2, 16, 8
    q = torch.randn(B, H * G, D, generator=g)
    one, per_head, per_row = torch.randn(D, D, generator=g), torch.randn(H, D, D, generator=g), torch.randn(B, H, D, D, generator=g)
    for rk in (one.expand(B, H, D, D), per_head.expand(B, H, D, D), per_row):
        rk = rk.to(dtype)
        want = torch.einsum("bhgd,bhkd->bhgk", q.view(B, H, G, D), rk[:, :, :dk].float().contiguous()).reshape(B, H * G, dk)
        got = GP.query_in_key_basis(q, rk, dk)
        assert got.dtype == torch.float32 and got.shape == (B, H * G, dk)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(GP.query_in_key_basis(q, None, dk), q[..., :dk])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_kernel_matches_its_twin_for_every_basis_form(dtype):
    # rotate_query's tl kernel (one launch) == query_in_key_basis (torch); G = 3 pads to 16 rows,
    # dk = 48 < D is a partial last chunk of 32 key channels; the identity is q's first dk columns
    g = torch.Generator().manual_seed(2)
    B, H, G, D, dk = 2, 3, 3, 64, 48
    q = torch.randn(B, H * G, D, generator=g).to(dtype)
    one, per_head, per_row = torch.randn(D, D, generator=g), torch.randn(H, D, D, generator=g), torch.randn(B, H, D, D, generator=g)
    for rk in (one.expand(B, H, D, D), per_head.expand(B, H, D, D), per_row):
        for rdt in (torch.float32, torch.float16):
            rk_ = rk.to(rdt)
            got, want = GP.rotate_query(q, rk_, dk), GP.query_in_key_basis(q, rk_, dk)
            assert got.dtype == torch.float32 and got.shape == (B, H * G, dk)
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    ident = GP.rotate_query(q, None, dk)
    assert ident.dtype == torch.float32 and torch.equal(ident, q[..., :dk].float())


@needs_triton
def test_auto_takes_the_gluon_path_by_head_dim_and_row_heads(monkeypatch):
    # measured (quant_decode.auto_picks_gluon): head_dim 128 at any batch; head_dim 64 from
    # GLUON_MIN_ROW_HEADS (row, KV head) pairs, below which the tl kernel was faster end to end
    from spectral_kv.kernels.quant_decode import GLUON_MIN_ROW_HEADS, auto_picks_gluon

    assert auto_picks_gluon(128, 1, 1) and auto_picks_gluon(128, 1, 8)
    assert not auto_picks_gluon(64, 1, 3) and not auto_picks_gluon(64, 8, 3) and auto_picks_gluon(64, 16, 8)
    assert auto_picks_gluon(64, GLUON_MIN_ROW_HEADS, 1) and not auto_picks_gluon(64, GLUON_MIN_ROW_HEADS - 1, 1)
    calls = []

    def twin(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, tps=0, max_registers=0):
        calls.append(tuple(qk.shape))
        return (*QG.cold_partials_reference(qk, kc, ks, kz, vc, vs, vz, nc, scaling, kl, vl, kg, max(tps, 1)), tps)

    monkeypatch.setattr(GP.QG, "cold_partials", twin)
    monkeypatch.setattr(GP, "gluon_serves", lambda *a, **k: (True, ""))
    big, _ = make(1, 1, 4, 128, 1, 128, ((128, 4),), ((128, 3),), 64, 3, [1], [3], seed=9)
    out = quant_decode(*big)  # head_dim 128, B * H = 1: the Gluon path
    assert calls == [(1, 4, 128)]
    assert torch.allclose(out, quant_decode_reference(*big), atol=1e-4, rtol=1e-4)
    small, _ = make(1, 1, 4, 64, 1, 128, ((64, 4),), ((64, 3),), 64, 3, [1], [3], seed=9)
    quant_decode(*small)  # head_dim 64, B * H = 1: the tl kernel
    quant_decode(*big, backend="triton")
    assert len(calls) == 1
