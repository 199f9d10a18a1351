"""The fused quantized decode kernel (`kernels.quant_decode`, the two rotations inside it)
against its torch reference and an independent float64 attention, at awkward sizes, every code
width, a mixed layout and shared / per-head / per-row / identity bases; the glue
(`attention.quant_fused`) against the `spectral` strategy and plain attention over the
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


def bases(kind, B, H, D, kl, vl, g):
    """Orthonormal basis rows (rk, rv) as the op takes them, [B, H, R, D]: ``shared`` one [D, D]
    expanded (stride 0), ``head`` [H, D, D] expanded over rows, ``row`` [B, H, kept, D] (only
    the kept rows, so R < D where a layout drops components), ``identity`` None."""
    def orth(*lead, rows=D):
        return torch.linalg.qr(torch.randn(*lead, D, D, generator=g, dtype=torch.float64))[0].float()[..., :rows, :]

    if kind == "identity":
        return None, None
    if kind == "shared":
        return orth().expand(B, H, D, D), orth().expand(B, H, D, D)
    if kind == "head":
        return orth(H).expand(B, H, D, D), orth(H).expand(B, H, D, D)
    assert kind == "row", kind
    return orth(B, H, rows=kl.kept), orth(B, H, rows=vl.kept)


def make(B, H, G, D, NB, T, kseg, vseg, kg, Te, n_cold=None, n_exact=None, seed=0, poison=True, basis="shared"):
    """Random raw codes, statistics and bases, packed into the layouts; returns (op args, raw pieces)."""
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
    q = torch.randn(B, H * G, D, generator=g)
    rk, rv = bases(basis, B, H, D, kl, vl, g)
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
    args = (q, rk, rv, kl.pack(kc), ks, kz, vl.pack(vc), vs, vz, n_cold, ek, ev, n_exact, D**-0.5, flat(kl), flat(vl), kg)
    return args, dict(kc=kc, vc=vc, kl=kl, vl=vl)


def attention64(args, raw, dtype=torch.float64):
    """Independent attention from the raw codes (never unpacked from the buffers), in ``dtype``,
    rotations included: scores ``(q @ R_kᵀ)[:Dk] . k``, cold output ``(p @ v) @ R_v[:Dv]``."""
    q, rk, rv, _, ks, kz, _, vs, vz, n_cold, ek, ev, n_exact, scaling, _, _, kg = args
    B, Hq, _ = q.shape
    H, Te, D = ek.shape[1:]
    NB, T = raw["kc"].shape[2], raw["kc"].shape[3]
    dk, dv = raw["kl"].kept, raw["vl"].kept
    outs = []
    for b in range(B):
        nc, ne = int(n_cold[b]), int(n_exact[b])
        k = raw["kc"][b, :, :nc].to(dtype) * ks[b, :, :nc].to(dtype).repeat_interleave(kg, 2) + kz[b, :, :nc].to(dtype).repeat_interleave(kg, 2)
        cols = [i for i, (c, _) in enumerate(raw["vl"].kept_segments) for _ in range(c)]
        v = raw["vc"][b, :, :nc].to(dtype) * vs[b, :, :nc][..., cols].to(dtype) + vz[b, :, :nc][..., cols].to(dtype)
        k, v = k.flatten(1, 2), v.flatten(1, 2)  # [H, nc*T, Dk]
        G = Hq // H
        qe = q[b].to(dtype).view(H, G, D)
        qb = qe[..., :dk] if rk is None else qe @ rk[b, :, :dk].to(dtype).transpose(-1, -2)
        s = torch.cat((qb @ k.transpose(-1, -2), qe @ ek[b, :, :ne].to(dtype).transpose(-1, -2)), -1) * scaling
        p = torch.softmax(s.double(), -1).nan_to_num(0.0).to(dtype) if s.shape[-1] else s
        oc = p[..., : k.shape[1]] @ v if s.shape[-1] else torch.zeros(H, G, dv, dtype=dtype)
        oc = torch.nn.functional.pad(oc, (0, D - dv)) if rv is None else oc @ rv[b, :, :dv].to(dtype)
        oe = p[..., k.shape[1]:] @ ev[b, :, :ne].to(dtype) if s.shape[-1] else torch.zeros(H, G, D, dtype=dtype)
        outs.append((oc + oe).reshape(Hq, D))
    return torch.stack(outs).double()


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
    assert ref.shape == args[0].shape and ref.dtype == args[0].dtype
    bound = 2 * (low - truth).abs().max() + 1e-6
    assert torch.isfinite(ref).all() and (ref.double() - truth).abs().max() <= bound, "reference"
    for operands, form in [("fp16", u) for u in unpack] + [("fp32", "auto")]:
        out = quant_decode(*args, operands=operands, unpack=form, **knobs)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.isfinite(out).all(), (operands, form)
        assert (out.double() - truth).abs().max() <= bound, f"kernel ({operands}, {form})"
        if operands == "fp32":
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


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


BASIS_LAYOUTS = {  # D, key layout, value layout
    "hd64": (64, ((64, 4),), ((64, 3),)),
    "hd128": (128, ((128, 4),), ((128, 3),)),
    "kept<D": (64, ((32, 4), (32, 0)), ((16, 7), (16, 1), (32, 0))),  # 32 of 64 components kept, 3 value segments
}


@needs_triton
@pytest.mark.parametrize("layout", sorted(BASIS_LAYOUTS))
@pytest.mark.parametrize("basis", ["identity", "shared", "head", "row"])
def test_bases_shared_per_head_per_row_identity(basis, layout):
    # the rotations inside the kernel: q @ R_k^T per key segment before the units, acc @ R_v per
    # value segment after them, for every basis form the glue hands over; ragged rows, G = 4
    D, kseg, vseg = BASIS_LAYOUTS[layout]
    args, raw = make(2, 2, 4, D, 2, 32, kseg, vseg, 16, 5, [2, 1], [5, 0], seed=D + len(basis), basis=basis)
    _check(args, raw)
    if basis == "shared":  # stride-0 broadcast dims read like materialized ones
        dense = args[:1] + (args[1].contiguous(), args[2].contiguous()) + args[3:]
        assert torch.equal(quant_decode(*dense), quant_decode(*args))
    if basis == "head":  # an fp16 basis (the learned layout's storage dtype) is read as fp32
        half = args[:1] + (args[1].half(), args[2].half()) + args[3:]
        ref = quant_decode_reference(*half)
        assert torch.allclose(quant_decode(*half, operands="fp32"), ref, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ref, quant_decode_reference(*args), atol=1e-4, rtol=1e-4)  # the dtype mattered


@needs_triton
def test_output_in_the_query_dtype():
    # bf16 model: the op returns bf16 (cast once, in the combine), within bf16 rounding of the fp32 math
    args, raw = make(2, 2, 4, 64, 2, 16, ((64, 4),), ((64, 3),), 16, 6, [2, 1], [6, 3], seed=21, poison=False)
    low = (args[0].bfloat16(),) + args[1:10] + (args[10].bfloat16(), args[11].bfloat16()) + args[12:]
    out, ref = quant_decode(*low), quant_decode_reference(*low)
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == (2, 8, 64)
    assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()


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
        assert torch.allclose(out, base, atol=1e-5, rtol=1e-5), knobs
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
    assert torch.isfinite(poisoned).all() and torch.equal(poisoned, clean)


@needs_triton
def test_bad_inputs_are_named():
    args, _ = make(1, 1, 2, 64, 1, 16, ((64, 4),), ((64, 4),), 16, 2)
    with pytest.raises(ValueError, match="rk must be fp16/bf16/fp32"):
        quant_decode(args[0], args[1].double(), *args[2:])
    with pytest.raises(ValueError, match=r"rv must be .*R >= 64.*\(1, 1, 16, 64\)"):  # fewer rows than kept
        quant_decode(*args[:2], args[2][:, :, :16], *args[3:])
    with pytest.raises(ValueError, match=r"rk must be .*\(64, 64\)"):  # not expanded to [B, H, R, D]
        quant_decode(args[0], args[1][0, 0], *args[2:])
    with pytest.raises(ValueError, match="key_layout keeps 32"):
        quant_decode(*args[:14], [32, 4], *args[15:])
    with pytest.raises(ValueError, match="key_group=5"):
        quant_decode(*args[:16], 5)
    with pytest.raises(ValueError, match="cold_blocks=-1"):
        quant_decode(*args, cold_blocks=-1)
    with pytest.raises(ValueError, match="n_cold/n_exact must be int32"):
        quant_decode(*args[:9], args[9].long(), *args[10:])
    with pytest.raises(ValueError, match="q shaped"):
        quant_decode(args[0][:, None], *args[1:])


@needs_triton
def test_opcheck():
    args, _ = make(1, 1, 3, 64, 2, 16, ((64, 4),), ((64, 3),), 8, 5, [2], [5], poison=False)
    # every opcheck utility, under the interpreter too (a custom_op with a fake impl: AOT dispatch
    # traces the fake, then runs the real kernel)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    ident, _ = make(1, 1, 3, 64, 2, 16, ((64, 4),), ((32, 3), (32, 0)), 8, 5, [2], [5], poison=False, basis="identity")
    for a in (args, ident):  # expanded (stride-0) bases, and None for the identity
        res = torch.library.opcheck(torch.ops.spectral_kv.quant_decode.default, a, test_utils=utils)
        assert all(v == "SUCCESS" for v in res.values()), res


@needs_triton
def test_traces_with_symbolic_shapes():
    # What test_aot_dispatch_dynamic does first, on any device: trace the op with every size a
    # SymInt (the block size is specialized, a compile-time constant of the kernel).
    from torch.fx.experimental.proxy_tensor import make_fx

    args, _ = make(2, 1, 3, 64, 2, 16, ((64, 4),), ((64, 3),), 8, 5, [2, 1], [5, 2], poison=False)
    gm = make_fx(lambda *a: torch.ops.spectral_kv.quant_decode(*a), tracing_mode="symbolic")(*args)
    assert torch.ops.spectral_kv.quant_decode.default in [n.target for n in gm.graph.nodes]
    assert torch.equal(gm(*args), quant_decode(*args))


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
def test_glue_hands_shared_bases_to_the_kernel():
    # a learned basis overriding the compressor's, shared [D, D], per head, per row: the glue
    # expands it (a view) and the op rotates with it, as the reference does with the same basis
    d, B, H, G = 64, 2, 2, 4
    cfg, kc, vc, cold_k, cold_v, g = _compressed("hadamard", 4, 3, d, B=B, H=H)
    q = torch.randn(B, H * G, 1, d, generator=g)
    ek, ev = torch.randn(B, H, 5, d, generator=g), torch.randn(B, H, 5, d, generator=g)
    n_cold, n_exact = torch.tensor([3, 2], dtype=torch.int32), torch.tensor([5, 1], dtype=torch.int32)
    kl, vl = kc.code_layout(d, 16), vc.code_layout(d, 16)
    flat = lambda layout: [x for s in layout.segments for x in s]  # noqa: E731
    kg = 16 // cold_k["scale"].shape[3]
    for lead in ((), (H,), (B, H)):
        rk, rv = (torch.linalg.qr(torch.randn(*lead, d, d, generator=g, dtype=torch.float64))[0].float() for _ in "kv")
        out = quant_fused_decode(q, kc, vc, cold_k, cold_v, n_cold, ek, ev, n_exact, d**-0.5, shared_k=rk, shared_v=rv)
        ref = quant_decode_reference(q[:, :, 0], rk.expand(B, H, d, d), rv.expand(B, H, d, d), cold_k["codes"],
                                     cold_k["scale"], cold_k["zero"], cold_v["codes"], cold_v["scale"], cold_v["zero"],
                                     n_cold, ek, ev, n_exact, d**-0.5, flat(kl), flat(vl), kg)
        assert torch.allclose(out[:, :, 0], ref, atol=1e-4, rtol=1e-4), lead
    own = quant_fused_decode(q, kc, vc, cold_k, cold_v, n_cold, ek, ev, n_exact, d**-0.5)
    assert not torch.allclose(own, out, atol=1e-2)  # the override was used, not the compressor's Hadamard
    with pytest.raises(ValueError, match=r"shared_k shaped \(3, 64, 64\)"):
        quant_fused_decode(q, kc, vc, cold_k, cold_v, n_cold, ek, ev, n_exact, 0.1, shared_k=torch.eye(d).expand(3, d, d))


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
