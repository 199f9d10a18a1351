"""The Gluon cold-loop kernel (`kernels/quant_decode_gluon.py`) without a GPU.

Gluon has no interpreter, so on CPU this checks what can run: the torch twin of the kernel's
split-K partials against `quant_decode_reference` (n_exact = 0), the value-pairing PTX strings in
the emulator of `test_quant_ptx.py` against the storage layout, and (triton 3.6, the GPU image's
version, only) the offline sm_90 compile: no spills, no shared-memory trip, no barrier. The GPU
check is `benchmarks/gluon_decode.py`.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from spectral_kv.codes import CodeLayout, planes, plane_rows
from spectral_kv.kernels import quant_decode_gluon as QG
from spectral_kv.kernels.quant_decode import quant_decode_reference
from spectral_kv.quant import BYTE_SCALE_NAN, byte_scale, byte_scale_code, group_stats

from test_quant_ptx import _prmt, M32


def _inputs(B, H, G, NB, T, dk, dv, kbits, vbits, kg, n_cold, seed=0):
    g = torch.Generator().manual_seed(seed)
    kl, vl = CodeLayout(T, ((dk, kbits),)), CodeLayout(T, ((dv, vbits),))
    kcode = torch.randint(0, 256, (B, H, NB, kl.nbytes), generator=g, dtype=torch.uint8)
    vcode = torch.randint(0, 256, (B, H, NB, vl.nbytes), generator=g, dtype=torch.uint8)
    ks = ((torch.rand(B, H, NB, T // kg, dk, generator=g) + 0.5) / 2**kbits).half()
    kz = (torch.randn(B, H, NB, T // kg, dk, generator=g) * 0.3).half()
    vs = ((torch.rand(B, H, NB, T, 1, generator=g) + 0.5) / 2**vbits).half()
    vz = (torch.randn(B, H, NB, T, 1, generator=g) * 0.3).half()
    for b, n in enumerate(n_cold):  # garbage past the counts must not reach the partials
        ks[b, :, n:] = float("nan")
        vz[b, :, n:] = float("nan")
    qk = torch.randn(B, H * G, dk, generator=g)
    return kl, vl, (qk, kcode, ks, kz, vcode, vs, vz, torch.tensor(n_cold, dtype=torch.int32))


@pytest.mark.parametrize("kbits,vbits,kg,tps", [(4, 3, 128, 3), (3, 2, 64, 1), (8, 4, 32, 5), (2, 8, 256, 2)])
def test_twin_partials_combine_to_the_reference(kbits, vbits, kg, tps):
    B, H, G, NB, T, dk = 2, 2, 3, 2, 256, 64
    kl, vl, (qk, kc, ks, kz, vc, vs, vz, nc) = _inputs(B, H, G, NB, T, dk, dk, kbits, vbits, kg, [2, 1])
    QG.check_layouts(kl, vl, G, kg)
    m, l, acc = QG.cold_partials_reference(qk, kc, ks, kz, vc, vs, vz, nc, dk**-0.5, kl, vl, kg, tps)
    _, _, nr = QG.unit_plan(kl, vl)
    assert m.shape == (B, H, -(-(NB * nr) // tps), G) and acc.shape == m.shape + (dk,)
    assert torch.isinf(m[1, :, -(-nr // tps) + 1:]).all()  # row 1 has one block: its later splits are empty
    out = QG.combine_partials(m, l, acc)
    empty = torch.zeros(B, H, 1, dk)
    # identity bases (None): the query is already in the key basis, the output stays in the value basis
    want = quant_decode_reference(qk, None, None, kc, ks, kz, vc, vs, vz, nc, empty, empty,
                                  torch.zeros(B, dtype=torch.int32), dk**-0.5, [dk, kbits], [dk, vbits], kg)
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5), (out - want).abs().max()


def _byte_stats(vs, n_cold, seed=0):
    """Byte value statistics (uint8 scale code, int8 zero point) of ``vs``'s shape: scales from 2**-10
    to ~6 (the float16 of each decoded zero ``-zp * scale`` is then exact), NaN code past the counts."""
    g = torch.Generator().manual_seed(seed)
    code = byte_scale_code(torch.rand(vs.shape, generator=g) * 6 + 2.0**-10)
    zp = torch.randint(-128, 128, vs.shape, generator=g, dtype=torch.int8)
    for b, n in enumerate(n_cold):  # a NaN scale past the counts must not reach the partials
        code[b, :, n:] = BYTE_SCALE_NAN
    return code, zp


@pytest.mark.parametrize("kbits,vbits,kg,tps", [(4, 3, 128, 3), (3, 2, 64, 1), (8, 4, 32, 5), (2, 8, 256, 2)])
def test_twin_reads_byte_statistics_as_their_float_values(kbits, vbits, kg, tps):
    # value_stats="byte": the twin decodes with quant.group_stats; the same statistics decoded first
    # (float16 holds them exactly here) give the same partials bit for bit, and they combine to the
    # op's reference on the byte form
    B, H, G, NB, T, dk = 2, 2, 3, 2, 256, 64
    kl, vl, (qk, kc, ks, kz, vc, vs, _, nc) = _inputs(B, H, G, NB, T, dk, dk, kbits, vbits, kg, [2, 1], seed=kbits)
    code, zp = _byte_stats(vs, [2, 1], seed=vbits)
    fs, fz = group_stats(code, zp)
    for b, n in enumerate([2, 1]):  # the blocks in use (past them: NaN codes)
        s, z = fs[b, :, :n], fz[b, :, :n]
        assert torch.isfinite(s).all() and torch.equal(s.half().float(), s) and torch.equal(z.half().float(), z)
    byte = QG.cold_partials_reference(qk, kc, ks, kz, vc, code, zp, nc, dk**-0.5, kl, vl, kg, tps)
    fp16 = QG.cold_partials_reference(qk, kc, ks, kz, vc, fs.half(), fz.half(), nc, dk**-0.5, kl, vl, kg, tps)
    for a, b in zip(byte, fp16):
        assert torch.equal(a, b)
    assert torch.isfinite(byte[1]).all() and torch.isfinite(byte[2]).all()  # NaN codes past the counts: never read
    out = QG.combine_partials(*byte)
    empty = torch.zeros(B, H, 1, dk)
    want = quant_decode_reference(qk, None, None, kc, ks, kz, vc, code, zp, nc, empty, empty,
                                  torch.zeros(B, dtype=torch.int32), dk**-0.5, [dk, kbits], [dk, vbits], kg)
    assert torch.isfinite(want).all()
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5), (out - want).abs().max()


def test_twin_nan_scale_code_makes_its_split_nan():
    # code 255 is NaN (quant.byte_scale): it reaches its split's acc for every head and channel, as the
    # Gluon kernel's VBYTE path makes it (m and l come from the keys: finite); other splits are untouched
    B, H, G, NB, T, dk, tps = 1, 2, 4, 2, 512, 64, 2
    kl, vl, (qk, kc, ks, kz, vc, vs, _, nc) = _inputs(B, H, G, NB, T, dk, dk, 4, 3, 64, [2])
    code, zp = _byte_stats(vs, [2])
    p_base, r_base, nr = QG.unit_plan(kl, vl)
    assert nr == 4
    n, toks = QG._unit_tokens(3, nr, r_base, p_base)  # unit 3 (block 0): split 1 of tps = 2
    code[0, 1, n, toks[5], 0] = BYTE_SCALE_NAN
    assert torch.isnan(byte_scale(code[0, 1, n, toks[5]])).all()
    m, l, acc = QG.cold_partials_reference(qk, kc, ks, kz, vc, code, zp, nc, dk**-0.5, kl, vl, 64, tps)
    assert torch.isfinite(m).all() and torch.isfinite(l).all()
    assert torch.isnan(acc[0, 1, 3 // tps]).all()
    nan = torch.zeros_like(acc, dtype=torch.bool)
    nan[0, 1, 3 // tps] = True
    assert torch.isfinite(acc[~nan]).all()


def test_cold_partials_names_statistics_dtypes_it_does_not_take():
    # checked before the launch (and before gluon is needed): fp16/fp16 or the byte form, keys fp16
    kl, vl, (qk, kc, ks, kz, vc, vs, vz, nc) = _inputs(1, 1, 2, 1, 128, 64, 64, 4, 3, 64, [1])
    code, zp = _byte_stats(vs, [1])
    for k_s, k_z, v_s, v_z, names in [(ks, kz, code, vz, "uint8/torch.float16"), (ks, kz, vs, zp, "float16/torch.int8"),
                                      (ks, kz, vs.float(), vz.float(), "float32/torch.float32"),
                                      (ks.float(), kz, vs, vz, "float32/torch.float16"),
                                      (ks, kz, code, zp.view(torch.uint8), "uint8/torch.uint8")]:
        with pytest.raises(ValueError, match=f"cold_partials: .*torch.{names}"):
            QG.cold_partials(qk, kc, k_s, k_z, vc, v_s, v_z, nc, 0.125, kl, vl, 64)
    with pytest.raises(ValueError, match="value_stats must be one of"):
        QG.kernel_constants(kl, vl, 64, value_stats="fp8")


def _ptx_statements(code):
    """(op, destination, sources) of each statement of a ``{ .reg ...; op d, a, b; ... }`` PTX block."""
    for stmt in code.strip()[1:-1].split(";"):
        stmt = stmt.strip()
        if stmt and not stmt.startswith(".reg"):
            op, args = stmt.split(None, 1)
            dst, *src = [x.strip() for x in args.split(",")]
            yield op, dst, src


def _run_zp(code, word):
    """Execute `QG.ZP_ASM` (bfe.s32 / cvt.rn.f32.s32 only) on one 32-bit ``$4``: the four fp32 outputs."""
    regs = {"$4": word}
    for op, dst, src in _ptx_statements(code):
        if op == "bfe.s32":  # sign-extended bit field (start, length)
            v = (regs[src[0]] >> int(src[1])) & ((1 << int(src[2])) - 1)
            regs[dst] = v - (1 << int(src[2])) if v >> (int(src[2]) - 1) else v
        elif op == "cvt.rn.f32.s32":
            regs[dst] = float(regs[src[0]])
        else:
            raise AssertionError(f"unexpected PTX op {op!r} in {code!r}")
    return [regs[f"${k}"] for k in range(4)]


def test_zero_point_ptx_gives_the_four_int8_values():
    zp = torch.arange(-128, 128, dtype=torch.int8)
    for k in range(4):  # every value in every byte of the register, the other bytes random
        other = torch.randint(0, 256, (256, 4), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        other[:, k] = zp.view(torch.uint8)
        for row in other:
            word = sum(int(b) << (8 * j) for j, b in enumerate(row.tolist()))
            assert _run_zp(QG.ZP_ASM, word) == [float(v) for v in row.view(torch.int8).tolist()]


def test_check_layouts_names_what_it_does_not_take():
    kl, vl = CodeLayout(512, ((128, 4),)), CodeLayout(512, ((128, 3),))
    with pytest.raises(ValueError, match="one segment"):
        QG.check_layouts(CodeLayout(512, ((64, 4), (64, 2))), vl, 4, 128)
    with pytest.raises(ValueError, match="G=17"):
        QG.check_layouts(kl, vl, 17, 128)
    with pytest.raises(ValueError, match="key_group=8"):
        QG.check_layouts(kl, vl, 4, 8)
    with pytest.raises(ValueError, match="width"):
        QG.check_layouts(kl, CodeLayout(512, ((128, 5),)), 4, 128)


def _run_pair(code, ins):
    """Execute a `pair_asm` string: inputs $4.. (plane 0 A, B, plane 1 A, B); returns the 8 fp16 bit
    patterns (A_0, B_0, A_1, B_1, ...) of its outputs $0..$3 (A in the low half)."""
    regs = {f"${4 + i}": v for i, v in enumerate(ins)}
    for op, dst, src in _ptx_statements(code):
        x = [regs[s] if s in regs else int(s, 0) for s in src]
        r = {"mov.b32": lambda: x[0], "shr.b32": lambda: x[0] >> x[1], "shl.b32": lambda: x[0] << x[1],
             "and.b32": lambda: x[0] & x[1], "or.b32": lambda: x[0] | x[1], "prmt.b32": lambda: _prmt(*x)}[op]()
        regs[dst] = r & M32
    return [regs[f"${c}"] >> (16 * e) & 0xFFFF for c in range(4) for e in (0, 1)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pair_ptx_gives_two_tokens_of_a_channel(bits):
    torch.manual_seed(bits)
    T, C = 64, 4
    codes = torch.randint(0, 2**bits, (T, C), dtype=torch.uint8)
    buf = CodeLayout.uniform(T, C, bits).pack(codes)
    pl, at = [], 0
    for p in planes(bits):
        pl.append(buf[at: at + plane_rows(T, p) * C].reshape(plane_rows(T, p), C))
        at += plane_rows(T, p) * C
    word = lambda p, row: sum(int(b) << (8 * k) for k, b in enumerate(pl[p][row].tolist()))  # noqa: E731
    for p_base in [p for p in (1, 2, 4, 8) if p <= planes(bits)[-1]]:
        r_base = plane_rows(T, p_base)
        for i in range(8 // p_base):
            code = QG.pair_asm(bits, i, p_base)
            for r in range(0, r_base, 2):  # tokens r_base * i + r (A) and + r + 1 (B)
                rows = [[r_base * (i % (p // p_base)) + r + e for j, p in enumerate(planes(bits))] for e in (0, 1)]
                ins = [word(j, rows[e][j]) for j in range(len(planes(bits))) for e in (0, 1)]
                got = _run_pair(code, ins)
                want = [int(codes[r_base * i + r + e, c]) for c in range(4) for e in (0, 1)]
                assert got == want, (bits, p_base, i, r, code)


def test_offline_sm90_compile_has_no_spills_and_no_shared_memory_trip():
    triton = pytest.importorskip("triton")
    if not QG.HAS_GLUON or not triton.__version__.startswith("3.6"):
        pytest.skip(f"the offline compile targets Triton 3.6 (the H200 image's); here {triton.__version__}")
    # a fresh interpreter: conftest turns on TRITON_INTERPRET, under which gluon cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    bench = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    code = ("import json, gluon_decode as g; print(json.dumps([g.compile_gluon(((128, k),), ((128, v),), "
            "value_stats=st) for k, v, st in ((4, 3, 'fp16'), (3, 2, 'fp16'), (4, 3, 'byte'))], default=dict)); "
            "print(json.dumps([g.compile_finish(128, 128, r) for r in (True, False)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for r in json.loads(out.stdout.strip().splitlines()[-1]):  # the Gluon path's finish kernel
        assert r["spill_bytes"] == 0, r
    for r in json.loads(out.stdout.strip().splitlines()[-2]):
        assert r["spill_bytes"] == 0, r
        assert r["shared"] == 0 and not any(r["loop"].get(k) for k in ("BAR", "STS", "LDS", "LDSM")), r
        assert r["loop"]["HMMA"] > 0
