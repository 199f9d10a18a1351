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
    for stmt in code.strip()[1:-1].split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *src = [x.strip() for x in args.split(",")]
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
    code = ("import json, gluon_decode as g; print(json.dumps([g.compile_gluon(((128, k),), ((128, v),)) "
            "for k, v in ((4, 3), (3, 2))], default=dict)); "
            "print(json.dumps([g.compile_finish(128, 128, r) for r in (True, False)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for r in json.loads(out.stdout.strip().splitlines()[-1]):  # the Gluon path's finish kernel
        assert r["spill_bytes"] == 0, r
    for r in json.loads(out.stdout.strip().splitlines()[-2]):
        assert r["spill_bytes"] == 0, r
        assert r["shared"] == 0 and not any(r["loop"].get(k) for k in ("BAR", "STS", "LDS", "LDSM")), r
        assert r["loop"]["HMMA"] > 0
