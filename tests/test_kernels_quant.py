"""The fused quantized decode kernel (`kernels.quant_decode`) against its torch reference and
an independent float64 attention, at awkward sizes, every code width and a mixed layout; the
glue (`attention.quant_fused`) against the `spectral` strategy and plain attention over the
compressors' decompressed blocks."""

import pytest
import torch

from spectral_kv.view import AttendView
from spectral_kv import ATTENTION_STRATEGIES, SpectralConfig
from spectral_kv.attention import reference_attention
from spectral_kv.attention.quant_fused import quant_fused_decode, serves_quant_fused
from spectral_kv.codes import CodeLayout
from spectral_kv.compressors import COMPRESSORS
from spectral_kv.kernels.quant_decode import HAS_TRITON, choose_tiles_per_split, quant_decode, quant_decode_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, H, G, D, NB, T, kseg, vseg, kg, Te, n_cold=None, n_exact=None, seed=0, poison=True):
    """Random raw codes and statistics, packed into the layouts; returns (op args, raw pieces)."""
    g = torch.Generator().manual_seed(seed)
    kl, vl = CodeLayout(T, kseg), CodeLayout(T, vseg)

    def raw(layout):
        return torch.cat([torch.randint(0, 2**b, (B, H, NB, T, c), generator=g, dtype=torch.uint8)
                          for c, b in layout.kept_segments], -1)

    kc, vc = raw(kl), raw(vl)
    nvs = len(vl.kept_segments)
    ks = (torch.rand(B, H, NB, T // kg, kl.kept, generator=g) * 0.3 + 0.02).half()
    kz = torch.randn(B, H, NB, T // kg, kl.kept, generator=g).half()
    vs = (torch.rand(B, H, NB, T, nvs, generator=g) * 0.3 + 0.02).half()
    vz = torch.randn(B, H, NB, T, nvs, generator=g).half()
    qk = torch.randn(B, H * G, kl.kept, generator=g)
    q = torch.randn(B, H * G, D, generator=g)
    ek, ev = torch.randn(B, H, Te, D, generator=g), torch.randn(B, H, Te, D, generator=g)
    n_cold = torch.randint(0, NB + 1, (B,), generator=g) if n_cold is None else torch.tensor(n_cold)
    n_exact = torch.randint(0, Te + 1, (B,), generator=g) if n_exact is None else torch.tensor(n_exact)
    n_cold, n_exact = n_cold.to(torch.int32), n_exact.to(torch.int32)
    if poison:  # garbage past the valid counts must never reach the output
        for i in range(B):
            ks[i, :, n_cold[i]:] = float("nan")
            vz[i, :, n_cold[i]:] = float("nan")
            ek[i, :, n_exact[i]:] = float("nan")
            ev[i, :, n_exact[i]:] = float("inf")
    flat = lambda layout: [x for s in layout.segments for x in s]  # noqa: E731
    args = (qk, q, kl.pack(kc), ks, kz, vl.pack(vc), vs, vz, n_cold, ek, ev, n_exact, D**-0.5, flat(kl), flat(vl), kg)
    return args, dict(kc=kc, vc=vc, vl=vl)


def attention64(args, raw, dtype=torch.float64):
    """Independent attention from the raw codes (never unpacked from the buffers), in ``dtype``."""
    qk, q, _, ks, kz, _, vs, vz, n_cold, ek, ev, n_exact, scaling, _, _, kg = args
    B, Hq, _ = qk.shape
    H, Te, D = ek.shape[1:]
    NB, T = raw["kc"].shape[2], raw["kc"].shape[3]
    outs = []
    for b in range(B):
        nc, ne = int(n_cold[b]), int(n_exact[b])
        k = raw["kc"][b, :, :nc].to(dtype) * ks[b, :, :nc].to(dtype).repeat_interleave(kg, 2) + kz[b, :, :nc].to(dtype).repeat_interleave(kg, 2)
        cols = [i for i, (c, _) in enumerate(raw["vl"].kept_segments) for _ in range(c)]
        v = raw["vc"][b, :, :nc].to(dtype) * vs[b, :, :nc][..., cols].to(dtype) + vz[b, :, :nc][..., cols].to(dtype)
        k, v = k.flatten(1, 2), v.flatten(1, 2)  # [H, nc*T, Dk]
        G = Hq // H
        qb, qe = qk[b].to(dtype).view(H, G, -1), q[b].to(dtype).view(H, G, D)
        s = torch.cat((qb @ k.transpose(-1, -2), qe @ ek[b, :, :ne].to(dtype).transpose(-1, -2)), -1) * scaling
        p = torch.softmax(s.double(), -1).nan_to_num(0.0).to(dtype) if s.shape[-1] else s
        oc = p[..., : k.shape[1]] @ v if s.shape[-1] else torch.zeros(H, G, v.shape[-1], dtype=dtype)
        oe = p[..., k.shape[1]:] @ ev[b, :, :ne].to(dtype) if s.shape[-1] else torch.zeros(H, G, D, dtype=dtype)
        outs.append((oc.reshape(Hq, -1), oe.reshape(Hq, D)))
    return torch.stack([o[0] for o in outs]).double(), torch.stack([o[1] for o in outs]).double()


CASES = {  # B, H, G, D, NB, T, key layout, value layout, key group, Te, n_cold, n_exact
    "hd64-k4v3-g4": (2, 2, 4, 64, 3, 32, ((64, 4),), ((64, 3),), 16, 5, None, None),
    "hd128-k4v3-1tok": (1, 1, 4, 128, 1, 64, ((128, 4),), ((128, 3),), 64, 1, [1], [1]),
    "hd96-k8-v5x3-g1": (2, 1, 1, 96, 1, 16, ((96, 8),), ((32, 5),) * 3, 8, 17, [1, 0], [17, 15]),
    "mixed-d64-g3-t8": (1, 2, 3, 64, 3, 8, ((16, 6), (16, 4), (32, 2)), ((16, 6), (16, 4), (32, 2)), 8, 9, [3], [7]),
    "dropped-d64-g8": (2, 1, 8, 64, 2, 16, ((32, 4), (32, 0)), ((16, 7), (16, 1), (32, 0)), 16, 15, None, None),
    "no-blocks": (2, 1, 4, 64, 0, 16, ((64, 4),), ((64, 4),), 16, 6, [0, 0], [6, 0]),
    "empty-exact": (1, 2, 4, 64, 1, 16, ((64, 2),), ((64, 2),), 4, 0, [1], [0]),
}


def _check(args, raw, unpack=("auto",), **knobs):
    """Both operand dtypes (fp16 in each code form of ``unpack``) within 2x the error of the same
    math in bf16 torch; the fp32 operands (exact fp32 dots under the interpreter) also within 1e-4
    of the reference."""
    ref = quant_decode_reference(*args)
    truth = attention64(args, raw)
    low = attention64(args, raw, torch.bfloat16)  # the same math in low-precision torch
    for operands, form in [("fp16", u) for u in unpack] + [("fp32", "auto")]:
        out = quant_decode(*args, operands=operands, unpack=form, **knobs)
        for o, r, t, lo, name in zip(out, ref, truth, low, ("out_cold", "out_exact")):
            assert torch.isfinite(o).all() and torch.isfinite(r).all(), name
            bound = 2 * (lo - t).abs().max() + 1e-6
            assert (r.double() - t).abs().max() <= bound, f"reference {name}"
            assert (o.double() - t).abs().max() <= bound, f"kernel {name} ({operands}, {form})"
            if operands == "fp32":
                assert torch.allclose(o, r, atol=1e-4, rtol=1e-4), name


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference_and_float64(case):
    # every fp16 code form: Triton's integer ops, and the two PTX forms' bit patterns (emulated
    # here; tests/test_quant_ptx.py runs the PTX strings themselves)
    B, H, G, D, NB, T, ks, vs, kg, Te, nc, ne = CASES[case]
    _check(*make(B, H, G, D, NB, T, ks, vs, kg, Te, nc, ne, seed=len(case)), unpack=("triton", "magic", "subnormal"))


@needs_triton
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_odd_blocks_ragged_rows(bits):
    # block +- 1 exact tokens, three blocks with rows holding 3 / 1 / 0 of them, G = 3
    args, raw = make(3, 1, 3, 64, 3, 16, ((64, bits),), ((32, 9 - bits), (32, bits)), 8, 17, [3, 1, 0], [17, 15, 16], seed=bits)
    _check(args, raw)


@needs_triton
def test_knobs_and_splits_give_the_same_answer():
    args, raw = make(2, 2, 4, 64, 5, 64, ((64, 4),), ((64, 3),), 32, 3, [5, 2], [3, 1], seed=9)
    # fp32 operands: fp16 rounds p * scale against each split's own running max, so splits
    # change the last bits there (the fp16 path is held to the 2x bound by _check)
    base = quant_decode(*args, operands="fp32")
    # one unit per program, two, and 32-row units (the default here: 16 rows, R_BASE = 8)
    # cold_blocks: a plan for fewer blocks than the pools hold (static pools' spare slots) still covers them all
    for knobs in (dict(tiles_per_split=1), dict(tiles_per_split=2, block_rows=16), dict(block_rows=32, num_warps=2),
                  dict(cold_blocks=1), dict(cold_blocks=3), dict(cold_blocks=99)):
        out = quant_decode(*args, operands="fp32", **knobs)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out, base)), knobs
    _check(args, raw, tiles_per_split=1, block_rows=32)
    assert choose_tiles_per_split(8, 64, 132) < choose_tiles_per_split(512, 64, 132)  # batch 1 splits more
    assert choose_tiles_per_split(8, 8, 132) == 1  # too few units to fill the SMs: one per program


@needs_triton
def test_many_splits_combine():
    # ~40 splits per (row, head): the combine sums them 16 at a time, with a ragged last chunk
    args, raw = make(2, 1, 4, 64, 41, 16, ((64, 4),), ((64, 2),), 16, 3, [41, 19], [3, 0], seed=12)
    _check(args, raw, tiles_per_split=1)
    with pytest.raises(ValueError, match="max_registers=8"):
        quant_decode(*args, max_registers=8)


@needs_triton
def test_poison_past_the_counts_does_not_leak():
    args, raw = make(2, 1, 4, 64, 3, 16, ((64, 3),), ((64, 2),), 16, 9, [1, 2], [4, 9], seed=3, poison=False)
    clean = quant_decode(*args)
    pargs, _ = make(2, 1, 4, 64, 3, 16, ((64, 3),), ((64, 2),), 16, 9, [1, 2], [4, 9], seed=3, poison=True)
    poisoned = quant_decode(*pargs)
    assert all(torch.isfinite(p).all() and torch.equal(p, c) for p, c in zip(poisoned, clean))


@needs_triton
def test_bad_inputs_are_named():
    args, _ = make(1, 1, 2, 64, 1, 16, ((64, 4),), ((64, 4),), 16, 2)
    with pytest.raises(ValueError, match="qk must be float32"):
        quant_decode(args[0].half(), *args[1:])
    with pytest.raises(ValueError, match="key_layout keeps 32"):
        quant_decode(*args[:13], [32, 4], *args[14:])
    with pytest.raises(ValueError, match="key_group=5"):
        quant_decode(*args[:15], 5)
    with pytest.raises(ValueError, match="cold_blocks=-1"):
        quant_decode(*args, cold_blocks=-1)
    with pytest.raises(ValueError, match="n_cold/n_exact must be int32"):
        quant_decode(*args[:8], args[8].long(), *args[9:])


@needs_triton
def test_opcheck():
    args, _ = make(1, 1, 3, 64, 2, 16, ((64, 4),), ((64, 3),), 8, 5, [2], [5], poison=False)
    # test_aot_dispatch_dynamic cannot pass under TRITON_INTERPRET=1 (wrap_triton returns the
    # bare interpreter, so AOT tracing records no kernel); the GPU bench runs the full opcheck.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    res = torch.library.opcheck(torch.ops.spectral_kv.quant_decode.default, args, test_utils=utils)
    assert all(v == "SUCCESS" for v in res.values()), res


@needs_triton
def test_traces_with_symbolic_shapes():
    # What test_aot_dispatch_dynamic does first, on any device: trace the op with every size a
    # SymInt (the block size is specialized, a compile-time constant of the kernel).
    from torch.fx.experimental.proxy_tensor import make_fx

    args, _ = make(2, 1, 3, 64, 2, 16, ((64, 4),), ((64, 3),), 8, 5, [2, 1], [5, 2], poison=False)
    gm = make_fx(lambda *a: torch.ops.spectral_kv.quant_decode(*a), tracing_mode="symbolic")(*args)
    assert torch.ops.spectral_kv.quant_decode.default in [n.target for n in gm.graph.nodes]
    assert all(torch.equal(a, b) for a, b in zip(gm(*args), quant_decode(*args)))


# ------------------------------------------------------------------ glue on real compressed blocks
def _compressed(name, bits, vbits, d, B=2, H=2, NB=3, T=16, group=16, seed=0):
    kw = dict(coeff_bits=bits, value_bits=vbits, quant_group=group) if name == "hadamard" else {}  # KIVI: fixed groups
    cfg = SpectralConfig(compressor=name, block_size=T, hot_buffer_size=2, **kw)
    kc, vc = COMPRESSORS[name](cfg, "keys", 0), COMPRESSORS[name](cfg, "values", 0)
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B * H * NB, T, d, generator=g), torch.randn(B * H * NB, T, d, generator=g)
    fold = lambda parts: {n: t.reshape(B, H, NB, *t.shape[1:]) for n, t in parts.items()}  # noqa: E731
    return cfg, kc, vc, fold(kc.compress(k)), fold(vc.compress(v)), g


@needs_triton
@pytest.mark.parametrize("name,bits,vbits", [("hadamard", 2, 2), ("hadamard", 3, 2), ("hadamard", 4, 3), ("hadamard", 8, 4),
                                             ("kivi4", None, None), ("kivi2", None, None)])
def test_glue_matches_spectral_and_plain_attention(name, bits, vbits):
    d, B, H, G = 64, 2, 2, 4
    cfg, kc, vc, cold_k, cold_v, g = _compressed(name, bits, vbits, d, B=B, H=H, group=32 if name != "hadamard" else 16)
    assert serves_quant_fused(kc, vc)
    q = torch.randn(B, H * G, 1, d, generator=g)
    ek, ev = torch.randn(B, H, 7, d, generator=g), torch.randn(B, H, 7, d, generator=g)
    n_cold, n_exact = torch.tensor([3, 1]), torch.tensor([7, 2])
    out = quant_fused_decode(q, kc, vc, cold_k, cold_v, n_cold, ek, ev, n_exact, d**-0.5)
    # plain float64 attention over the compressor's decompressed blocks
    keys, values = kc.decompress(cold_k, torch.float64), vc.decompress(cold_v, torch.float64)
    for b in range(B):
        nc, ne = int(n_cold[b]), int(n_exact[b])
        kk = torch.cat((keys[b : b + 1, :, :nc].flatten(2, 3), ek[b : b + 1, :, :ne].double()), 2)
        vv = torch.cat((values[b : b + 1, :, :nc].flatten(2, 3), ev[b : b + 1, :, :ne].double()), 2)
        ref = reference_attention(q[b : b + 1], kk, vv, None, d**-0.5)
        assert torch.allclose(out[b : b + 1].double(), ref, atol=2e-5, rtol=1e-4)
    # the readable torch strategy on the same blocks (KIVI too: factored in the identity basis),
    # and the `fused` strategy, which must route this static view to the quantized kernel
    view = AttendView(exact_k=ek, exact_v=ev, cold_k=cold_k, cold_v=cold_v, n_exact=n_exact.int(), n_cold=n_cold.int())
    spec = ATTENTION_STRATEGIES["spectral"](cfg, kc, vc).attend(q, view, d**-0.5)
    assert torch.allclose(out, spec, atol=2e-5, rtol=1e-4)
    fused = ATTENTION_STRATEGIES["fused"](cfg, kc, vc)
    assert fused.kernel == "quant"
    assert torch.equal(fused.attend(q, view, d**-0.5), out)
    assert (fused.kernel_calls, fused.fallback_calls) == (1, 0)


@needs_triton
def test_glue_refuses_what_it_cannot_serve():
    d = 64
    cfg, kc, vc, cold_k, cold_v, g = _compressed("hadamard", 4, 3, d)
    q = torch.randn(2, 8, 1, d, generator=g)
    ek = torch.randn(2, 2, 3, d, generator=g)
    n = torch.tensor([1, 1])
    args = (cold_k, cold_v, n, ek, ek, n, 0.1)
    with pytest.raises(ValueError, match="Tq=1"):
        quant_fused_decode(torch.randn(2, 8, 2, d), kc, vc, *args)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        quant_fused_decode(q.double(), kc, vc, cold_k, cold_v, n, ek.double(), ek.double(), n, 0.1)
    with pytest.raises(ValueError, match="head_dim=8"):
        quant_fused_decode(torch.randn(2, 8, 1, 8), kc, vc, cold_k, cold_v, n, ek[..., :8], ek[..., :8], n, 0.1)
    svd = COMPRESSORS["exact_svd"](SpectralConfig(block_size=16, hot_buffer_size=2), "keys", 4)
    unquantized = COMPRESSORS["hadamard"](SpectralConfig(block_size=16, hot_buffer_size=2, coeff_bits=None, value_bits=None), "keys", 0)
    for bad in (svd, unquantized):
        assert not serves_quant_fused(bad, vc)
        with pytest.raises(ValueError, match="cannot serve the layout"):
            quant_fused_decode(q, bad, vc, *args)
