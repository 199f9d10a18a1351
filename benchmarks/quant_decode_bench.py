"""GPU benchmark: the fused quantized decode kernel (`balanced`, `max-compression`, `balanced+byte`:
balanced with byte value statistics, its kernel row only; a mixed learned-style layout) and the SVD
`fast` kernel vs SDPA (flash) over dense bf16 K/V; one layer,
32 query / 8 KV heads, head_dim 128, 512-token blocks + 68 exact tokens (4 sinks + 64 hot).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/quant_decode_bench.py [--out DIR] [--quick] [--sweep]
    PYTHONPATH=. python benchmarks/quant_decode_bench.py --cpu-smoke   # CI: tiny sizes, TRITON_INTERPRET=1

Order: correctness (kernels vs their fp32 references on fresh random inputs, NaN past the counts;
exit 1 on failure), the copy and read bandwidths of this card, the timing table, the fused
compression op, then the short table. Every time is the median of `triton.testing.do_bench` over
one CUDA graph holding one call per input set (sets like layers, enough that the working set is
>= 3x the L2), divided by the sets. "kernel" times the op alone (``backend="auto"``: the Gluon path
for the one-segment layouts on CUDA where `quant_decode.auto_picks_gluon` says so, `balanced` and
`max-compression`; where the Gluon path serves, the path auto did not take as well: "<layout> tl"
the same op with ``backend="triton"``, "<layout> gluon" with ``backend="gluon"``), "step" the whole decode step of `attention.quant_fused.quant_fused_decode`: since issue 13 both rotations are inside the op, so
the step is its checks (host only) + the op, and the two rows should agree in graph timing.
Bytes of a layout: its cold codes + scales/zeros (+ the SVD bases) + the exact tail, bf16.
Longer than ~350 lines: correctness, bandwidths, the table and the sweep read as one script (the
compression part is benchmarks/quant_compress_bench.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if "--cpu-smoke" in sys.argv:  # read when triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from spectral_kv.attention.quant_fused import quant_fused_decode  # noqa: E402
from spectral_kv.codes import CodeLayout  # noqa: E402
from spectral_kv.compressors import COMPRESSORS  # noqa: E402
from spectral_kv.config import SpectralConfig  # noqa: E402
from spectral_kv.kernels import fused_decode as fd  # noqa: E402
from spectral_kv.kernels import quant_decode as qd  # noqa: E402
from spectral_kv.kernels.inputs import svd_decode_inputs  # noqa: E402
from spectral_kv.quant import BYTE_SCALE_NAN, byte_scale, byte_scale_code  # noqa: E402

import quant_compress_bench as parts  # noqa: E402  (benchmarks/: the fused compression op)
from graph_capture import capture  # noqa: E402

H, G, D, T, TE, RK, RV = 8, 4, 128, 512, 68, 16, 32
SIZES = [(1, 4096), (1, 32768), (16, 32768), (4, 131072), (64, 32768)]
QUICK = [(1, 4096), (8, 32768), (16, 32768)]  # 8 x 32K: the e2e shape
TOL = 1e-2  # bf16 inputs, tf32 dots: ~1e-3 expected
MIXED = (((32, 6), (32, 4), (64, 2)), ((32, 5), (32, 3), (64, 2)))
LOG: list[str] = []
DEV = "cuda"
T0 = time.time()


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


# ----------------------------------------------------------------------------- layouts
class Learned:
    """Stand-in for a learned-basis compressor: a mixed `CodeLayout` in one orthonormal basis."""

    bits = 1  # any int: "quantized" (serves_quant_fused)

    def __init__(self, segments, basis):
        self.segments, self.basis, self._on = segments, basis, {}

    def code_layout(self, head_dim, tokens=None):
        return CodeLayout(tokens, self.segments)

    def rotation_on(self, d, device):
        # cached per device like the compressors', copied only when missing: a CPU->GPU copy
        # inside a CUDA-graph capture fails (graph_ms warms every fn up before capturing)
        key = str(torch.device(device))
        if key not in self._on:
            self._on[key] = self.basis.to(device)
        return self._on[key]


ONE_ROW = ("balanced+byte",)  # layouts timed as the op alone (backend="auto"): one table row per size


def layouts(t):
    """name -> (key compressor, value compressor, key_group) for blocks of ``t`` tokens; "balanced+byte"
    is `balanced` with ``value_stats="byte"`` (uint8 scale code / int8 zero point per value token)."""
    out = {}
    for name, extra in (("balanced", {}), ("max-compression", {}), ("balanced+byte", dict(value_stats="byte"))):
        cfg = SpectralConfig.preset(name.split("+")[0], block_size=t, hot_buffer_size=min(64, t // 2), **extra)
        kc = COMPRESSORS[cfg.compressor_name("keys")](cfg, "keys", cfg.k_rank_keys)
        vc = COMPRESSORS[cfg.compressor_name("values")](cfg, "values", cfg.k_rank_values)
        out[name] = (kc, vc, min(cfg.quant_group, t))
    g = torch.Generator().manual_seed(5)
    basis = lambda: torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()  # noqa: E731
    out["mixed"] = (Learned(MIXED[0], basis()), Learned(MIXED[1], basis()), min(128, t))
    # the spectral-5x preset's code layout at head_dim 128 (learned-basis keys 4/3 bits, 2-bit values)
    out["spectral-5x"] = (Learned(((D // 4, 4), (D - D // 4, 3)), basis()), Learned(((D, 2),), basis()), min(128, t))
    return out


def flat(layout):
    return [x for seg in layout.segments for x in seg]


def _byte_stats(lay):
    """Whether the layout's value statistics are the byte form (``value_stats="byte"``)."""
    return getattr(lay[1], "stats", "fp16") == "byte"


def quant_inputs(lay, B, Hh, Gg, NB, t, Te, n_cold=None, n_exact=None, poison=True, seed=0, dtype=torch.bfloat16):
    """Random codes (any byte is a valid code), scales ~ 2 / levels, and an exact tail: a dict
    with the op's arguments (``op``) and the glue's (``glue``). Byte value statistics (`_byte_stats`):
    the same scales as codes (rounded up), zero points of the same zeros; the NaN code past the counts."""
    kc, vc, kg = lay
    kl, vl = kc.code_layout(D, t), vc.code_layout(D, t)
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, device=DEV)  # noqa: E731
    levels = lambda lay_: torch.tensor([2.0**b - 1 for c, b in lay_.kept_segments for _ in range(c)], device=DEV)  # noqa: E731
    vlev = torch.tensor([2.0**b - 1 for _, b in vl.kept_segments], device=DEV)
    ks = ((u(B, Hh, NB, t // kg, kl.kept) * 0.5 + 0.5) * 2 / levels(kl)).half()
    kz = (r(B, Hh, NB, t // kg, kl.kept) * 0.3 - 1).half()
    vs = ((u(B, Hh, NB, t, len(vl.kept_segments)) * 0.5 + 0.5) * 2 / vlev).half()
    vz = (r(B, Hh, NB, t, len(vl.kept_segments)) * 0.3 - 1).half()
    kcode = torch.randint(0, 256, (B, Hh, NB, kl.nbytes), generator=g, device=DEV, dtype=torch.uint8)
    vcode = torch.randint(0, 256, (B, Hh, NB, vl.nbytes), generator=g, device=DEV, dtype=torch.uint8)
    q = r(B, Hh * Gg, 1, D).to(dtype)
    ek, ev = r(B, Hh, Te, D).to(dtype), r(B, Hh, Te, D).to(dtype)
    n_cold = [NB] * B if n_cold is None else n_cold
    n_exact = [Te] * B if n_exact is None else n_exact
    if _byte_stats(lay):
        code = byte_scale_code(vs.float())
        vz = torch.round(-vz.float() / byte_scale(code)).clamp_(-128, 127).to(torch.int8)
        vs = code
    if poison:  # garbage past the counts must never reach the output
        for b in range(B):
            ks[b, :, n_cold[b]:] = float("nan")
            if vs.dtype == torch.uint8:
                vs[b, :, n_cold[b]:] = BYTE_SCALE_NAN
            else:
                vz[b, :, n_cold[b]:] = float("nan")
            ek[b, :, n_exact[b]:] = float("nan")
            ev[b, :, n_exact[b]:] = float("inf")
    nc = torch.tensor(n_cold, dtype=torch.int32, device=DEV)
    ne = torch.tensor(n_exact, dtype=torch.int32, device=DEV)
    # the bases as the glue hands them to the op: shared [D, D] expanded (stride 0), or None (identity)
    rk, rv = (None if r is None else r.expand(B, Hh, *r.shape) for r in (kc.rotation_on(D, DEV), vc.rotation_on(D, DEV)))
    op = (q.reshape(B, Hh * Gg, D), rk, rv, kcode, ks, kz, vcode, vs, vz, nc, ek, ev, ne, D**-0.5, flat(kl), flat(vl), kg)
    glue = (q, kc, vc, dict(codes=kcode, scale=ks, zero=kz), dict(codes=vcode, scale=vs, zero=vz), nc, ek, ev, ne, D**-0.5)
    return dict(op=op, glue=glue)


def quant_bytes(lay, B, NB, t, Te):
    kc, vc, kg = lay
    kl, vl = kc.code_layout(D, t), vc.code_layout(D, t)
    # scale + zero: 2 + 2 bytes (float16), or 1 + 1 (byte value statistics)
    v_stats = (2 if _byte_stats(lay) else 4) * t * len(vl.kept_segments)
    per_block = kl.nbytes + vl.nbytes + 4 * (t // kg) * kl.kept + v_stats
    return B * H * (NB * per_block + Te * D * 2 * 2)


def svd_inputs(B, Hh, Gg, NB, t, Te, n_cold=None, n_exact=None, poison=True, seed=0, dtype=torch.bfloat16):
    """`fused_decode`'s arguments, from the kernel's shared builder (decaying scales), every row
    full unless counts are given."""
    x = svd_decode_inputs(B, Hh, Gg, D, t, NB, Te, rk=RK, rv=RV, dtype=dtype, seed=seed, device=DEV, poison=poison,
                          decay=True, n_cold=[NB] * B if n_cold is None else n_cold,
                          n_exact=[Te] * B if n_exact is None else n_exact)
    return tuple(x.values())


def svd_bytes(B, NB, t, Te):
    return B * H * (NB * (t * (RK + RV) + (RK + RV) * (4 + 2 * D)) + Te * D * 2 * 2)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- correctness
def correctness(smoke, full=False):
    log("== correctness: kernels vs fp32 references (fresh random inputs, NaN/inf past the counts), "
        f"pass if rel. error < {TOL:g}")
    t, NB, Te, Hh = (16, 2, 5, 1) if smoke else (T, 9, TE, H)
    nc, ne = [NB, 1, 0, 0], [Te, 1, Te // 2, 0]  # ragged rows; the last row attends to nothing
    # tiles_per_split is a runtime argument; every other knob (and G, and the layout) compiles
    # the kernel again: ~15-20 s each on the H200 for these unrolled kernels. Without --full-check
    # the timed configurations (default knobs, G=4) of every layout are checked, plus balanced at
    # G=1, one split per unit and tf32 operands; CPU CI covers the rest under the interpreter.
    ok = True
    for name, lay in layouts(t).items():
        for Gg in (4, 1) if name == "balanced" or (full and not smoke) else (4,):
            # ragged rows, then (where the Gluon path serves) every row full
            for counts in ((nc, ne), ([NB] * 4, [Te] * 4)):
                x = quant_inputs(lay, 4, Hh, Gg, NB, t, Te, *counts, seed=10 * len(name) + Gg + len(set(counts[0])))
                path = backend_of(x["op"])
                if not smoke and name in ("balanced", "max-compression", "balanced+byte") and path != "gluon":
                    ok = False  # the Gluon path must serve these on the GPU: said, not silently timed on tl
                    log(f"  FAIL: {name} G={Gg} not served by the Gluon path: {backend_why(x['op'])}")
                if counts[0] != nc and path != "gluon":
                    continue
                ref = qd.quant_decode_reference(*x["op"])
                errs = []
                # auto (the Gluon path where it serves), its split knob, and the tl kernel forced
                knobs = [{}] if smoke else [{}, dict(tiles_per_split=1)] + ([dict(backend="triton")] if path == "gluon" else [])
                if not smoke and (full or (name == "balanced" and Gg == 4)):
                    knobs.append(dict(operands="fp32"))
                extra = [dict(tiles_per_split=3, block_rows=16, num_warps=8), dict(block_rows=64, num_warps=8, num_stages=3)] \
                    if name == "balanced" and full and not smoke else []
                for kn in knobs + extra:
                    out = qd.quant_decode(*x["op"], **kn)
                    errs.append(rel(out, ref) if torch.isfinite(out).all() else float("nan"))
                if path == "gluon":  # auto did take the Gluon path: the same bits as forcing it
                    same = torch.equal(qd.quant_decode(*x["op"]), qd.quant_decode(*x["op"], backend="gluon"))
                    errs.append(0.0 if same else float("nan"))
                good = all(e < TOL for e in errs)  # NaN compares False
                ok &= good
                log(f"  quant_decode {name:15s} G={Gg} B=4 H={Hh} NB={NB} T={t} Te={Te} bf16 "
                    f"{'ragged' if counts[0] == nc else 'full'} auto={path} knobs {len(knobs + extra)}: "
                    f"rel_err {' '.join('%.1e' % e for e in errs)} {'OK' if good else 'FAIL'}")
        # the glue (checks + the op, which rotates) against the reference, computed in fp32 (fp32 query)
        x = quant_inputs(lay, 4, Hh, 4, NB, t, Te, nc, ne, seed=11)
        want = qd.quant_decode_reference(x["op"][0].float(), *x["op"][1:10], x["op"][10].float(), x["op"][11].float(),
                                         *x["op"][12:])
        e = rel(quant_fused_decode(*x["glue"]).squeeze(2).float(), want)
        ok &= e < TOL
        log(f"  quant_fused_decode {name:15s} (bf16 output) rel_err {e:.1e} {'OK' if e < TOL else 'FAIL'}")
    for Gg in (4, 1):
        a = svd_inputs(2, Hh, Gg, NB, t, Te, [NB, 2], [Te, 1], seed=20 + Gg)
        ref = fd.fused_decode_reference(*a)
        errs = [rel(fd.fused_decode(*a, **kn), ref) for kn in ([{}] if smoke or (Gg == 1 and not full) else [{}, dict(blocks_per_split=1)])]
        good = all(e < TOL for e in errs)
        ok &= good
        log(f"  fused_decode (SVD int8 rank {RK}/{RV}) G={Gg}: rel_err {' '.join('%.1e' % e for e in errs)} "
            f"{'OK' if good else 'FAIL'}")
    if not smoke:
        ok &= graph_and_opcheck()
    ok &= parts.compress_correctness(DEV, smoke, log)
    log(f"  correctness overall: {'PASS' if ok else 'FAIL'}")
    return ok


def backend_why(op_args):
    """`quant_decode.gluon_serves` for these op arguments (default knobs): (bool, reason)."""
    q, _, _, kc, ks, _, vc, vs, *_ = op_args
    kl, vl = qd._layouts(kc, vs, op_args[14], op_args[15], op_args[16])
    return qd.gluon_serves(q, kc, ks, vc, vs, kl, vl, op_args[16], interpreted=qd._interpreted())


def backend_of(op_args):
    """"gluon" or "triton": the path ``backend="auto"`` takes for these op arguments."""
    q, ek = op_args[0], op_args[10]
    return "gluon" if backend_why(op_args)[0] and qd.auto_picks_gluon(q.shape[2], q.shape[0], ek.shape[1]) else "triton"


def graph_and_opcheck():
    good = True
    for name, B, nc, ne in (("balanced", 2, [3, 1], [TE, 5]), ("balanced", 4, [3] * 4, [TE] * 4),
                            ("max-compression", 4, [3, 0, 2, 1], [TE, 3, 0, 1])):
        x = quant_inputs(layouts(T)[name], B, H, G, 3, T, TE, nc, ne, poison=False, seed=3 + B)
        for backend in ("auto", "triton"):
            eager = qd.quant_decode(*x["op"], backend=backend)
            gr = torch.cuda.CUDAGraph()
            torch.cuda.synchronize()
            with torch.cuda.graph(gr):
                captured = qd.quant_decode(*x["op"], backend=backend)
            gr.replay()
            torch.cuda.synchronize()
            same = torch.equal(eager, captured)
            good &= same
            log(f"  quant_decode {name} B={B} backend={backend} ({backend_of(x['op']) if backend == 'auto' else 'triton'})"
                f" in a CUDA graph == eager: {same}")
    x = quant_inputs(layouts(T)["balanced"], 2, H, G, 3, T, TE, [3, 1], [TE, 5], poison=False, seed=3)
    for backend in ("auto", "triton"):
        try:
            res = torch.library.opcheck(torch.ops.spectral_kv.quant_decode.default, x["op"], dict(backend=backend))
            good &= all(v == "SUCCESS" for v in res.values())
            log(f"  opcheck spectral_kv::quant_decode (CUDA, backend={backend}): {res}")
        except Exception as exc:
            good = False
            log(f"  opcheck (backend={backend}) FAILED: {exc!r}"[:2000])
    return good


# ----------------------------------------------------------------------------- timing
def graph_ms(fns, rep=60):
    """Median ms per call of replaying one CUDA graph that calls every fn once."""
    g = capture(fns)
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=rep, return_mode="median")
    del g
    return ms / len(fns)


def eager_ms(fns, rep=60):
    """Median ms per call of `triton.testing.do_bench` on the fns one after the other (no graph)."""
    return triton.testing.do_bench(lambda: [f() for f in fns], warmup=10, rep=rep, return_mode="median") / len(fns)


def wall_ms(fns, rep=0):
    """CPU smoke stand-in for `graph_ms` (exercises the table's code path, not a measurement)."""
    t0 = time.perf_counter()
    for f in fns:
        f()
    return (time.perf_counter() - t0) * 1e3 / len(fns)


def bandwidths(timer):
    n = (1 << 30) if DEV == "cuda" else (1 << 20)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    copy = 2 * n / timer([lambda: dst.copy_(src)]) / 1e6  # GB/s, read + write
    x = src.view(torch.float32)
    read = n / timer([lambda: x.sum()]) / 1e6
    del src, dst
    log(f"\n== bandwidth: device-to-device copy {copy:.0f} GB/s (read + write), read (sum of fp32) {read:.0f} GB/s")
    return copy, read


def n_sets(nbytes, l2, cap=64):
    return max(1, min(cap, math.ceil(3 * l2 / nbytes)))


def fits(nbytes):
    return DEV != "cuda" or torch.cuda.mem_get_info()[0] > 1.3 * nbytes + (2 << 30)


def time_shape(B, ctx, timer, l2, t):
    """{method: (ms, bytes)} for one B x ctx; SDPA under 'sdpa' (absent if it does not fit)."""
    NB, Te = ctx // t, TE if t == T else 5
    L = NB * t + Te
    dense_b = B * H * L * D * 2 * 2
    out = {}
    log(f"\n== B={B} ctx={ctx}: {NB} blocks of {t} + {Te} exact; dense K/V {dense_b / 1e6:.1f} MB per layer "
        f"(at {time.time() - T0:.0f} s)")
    if fits(dense_b):
        k = [(torch.randn(B, H * G, 1, D, device=DEV, dtype=torch.bfloat16),
              torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16),
              torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16)) for _ in range(n_sets(dense_b, l2))]

        backends = [SDPBackend.FLASH_ATTENTION]
        try:
            with sdpa_kernel(backends):
                F.scaled_dot_product_attention(k[0][0], k[0][1], k[0][2], enable_gqa=True)
        except RuntimeError as exc:  # said, not hidden: the table's baseline is then another backend
            backends = list(SDPBackend)
            log(f"  [warn] flash SDPA with enable_gqa refused ({str(exc)[:200]!r}); timing torch's own choice")

        def sdpa(d):
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(d[0], d[1], d[2], enable_gqa=True)

        out["sdpa"] = (timer([lambda d=d: sdpa(d) for d in k]), dense_b)
        log(f"  sdpa ({'flash' if len(backends) == 1 else 'default backend'}, {len(k)} sets): {out['sdpa'][0]:.4f} ms")
        del k
    else:
        log(f"  sdpa SKIPPED: {dense_b / 1e9:.1f} GB of dense K/V does not fit in the free memory")
    for name, lay in layouts(t).items():
        nbytes = quant_bytes(lay, B, NB, t, Te)
        sets = [quant_inputs(lay, B, H, G, NB, t, Te, poison=False, seed=s) for s in range(n_sets(nbytes, l2))]
        path = backend_of(sets[0]["op"])  # "kernel" / "step": backend="auto", the Gluon path where it serves
        out[f"{name} kernel"] = (timer([lambda x=x: qd.quant_decode(*x["op"]) for x in sets]), nbytes)
        if name in ONE_ROW:
            log(f"  [{time.time() - T0:.0f} s] {name} ({len(sets)} sets, auto={path}): "
                f"kernel {out[f'{name} kernel'][0]:.4f} ms")
            del sets
            continue
        out[f"{name} step"] = (timer([lambda x=x: quant_fused_decode(*x["glue"]) for x in sets]), nbytes)
        log(f"  [{time.time() - T0:.0f} s] {name} ({len(sets)} sets, auto={path}): kernel {out[f'{name} kernel'][0]:.4f} ms, "
            f"step {out[f'{name} step'][0]:.4f} ms")
        if backend_why(sets[0]["op"])[0]:  # the path auto did not take on the same inputs, for the comparison
            other, label = ("triton", "tl") if path == "gluon" else ("gluon", "gluon")
            out[f"{name} {label}"] = (timer([lambda x=x: qd.quant_decode(*x["op"], backend=other) for x in sets]), nbytes)
            log(f"    {name} {label} (backend={other!r}): {out[f'{name} {label}'][0]:.4f} ms")
        del sets
    nbytes = svd_bytes(B, NB, t, Te)
    sets = [svd_inputs(B, H, G, NB, t, Te, poison=False, seed=s) for s in range(n_sets(nbytes, l2))]
    out["fast (SVD)"] = (timer([lambda a=a: fd.fused_decode(*a) for a in sets]), nbytes)
    log(f"  fast SVD ({len(sets)} sets): {out['fast (SVD)'][0]:.4f} ms")
    del sets
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out, dense_b


def report(B, ctx, out, dense_b, copy_bw):
    sd = out.get("sdpa", (float("nan"), dense_b))[0]
    log(f"  {'method':24s} {'ms':>8s} {'x SDPA':>7s} {'GB/s':>6s} {'%copy':>6s} {'bytes x':>8s} {'%of bytes x':>11s}")
    rows = []
    for name, (ms, nbytes) in out.items():
        gbs, bx = nbytes / ms / 1e6, dense_b / nbytes
        frac = (sd / ms) / bx
        log(f"  {name:24s} {ms:8.4f} {sd / ms:7.2f} {gbs:6.0f} {100 * gbs / copy_bw:6.1f} {bx:8.2f} {100 * frac:11.1f}")
        rows.append((B, ctx, name, ms, sd / ms, gbs, 100 * gbs / copy_bw, bx, 100 * frac))
    return rows


def sweep(timer, l2):
    """Knobs of quant_decode for `balanced` and `max-compression` at 1 x 4K and 8 x 32K (the e2e
    shape, one input set there: already > L2)."""
    rows = {}
    for name in ("balanced", "max-compression"):
        lay = layouts(T)[name]
        for B, ctx in ((1, 4096), (8, 32768)):
            NB = ctx // T
            nsets = n_sets(quant_bytes(lay, B, NB, T, TE), l2, cap=16)
            sets = [quant_inputs(lay, B, H, G, NB, T, TE, poison=False, seed=s) for s in range(nsets)]
            log(f"\n== sweep: quant_decode knobs, {name}, B={B} ctx={ctx} ({nsets} sets; 0 = heuristic)")
            res = []
            for br in (16, 32, 64):
                for nw in (4, 8):
                    for ns in (1, 2, 3):
                        for tps in (0, 1, 4, 16):
                            kn = dict(tiles_per_split=tps, block_rows=br, num_warps=nw, num_stages=ns)
                            try:
                                ms = timer([lambda x=x: qd.quant_decode(*x["op"], **kn) for x in sets], rep=30)
                            except Exception as exc:  # e.g. out of shared memory / registers for this tile
                                log(f"    {kn} failed: {exc!r}"[:300])
                                break
                            res.append((ms, kn))
            for kn in (dict(), dict(operands="fp32")):  # the heuristic, and the tf32 operands
                res.append((timer([lambda x=x: qd.quant_decode(*x["op"], **kn) for x in sets], rep=30), dict(kn, default=1)))
            res.sort(key=lambda r: r[0])
            for ms, kn in res[:10]:
                log(f"    {ms * 1e3:8.1f} us  {kn}")
            dflt = {k.get("operands", "fp16"): m for m, k in res if "default" in k}
            log(f"  best: {res[0][1]} at {res[0][0] * 1e3:.1f} us; heuristic default {dflt['fp16'] * 1e3:.1f} us, "
                f"operands=fp32 {dflt['fp32'] * 1e3:.1f} us")
            rows[(name, B, ctx)] = res
            del sets
    return rows


def main():
    global DEV, H
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="1x4K, 8x32K and 16x32K only")
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernel's knobs at 1x4K and 8x32K")
    ap.add_argument("--full-check", action="store_true", help="every knob variant x G in the correctness pass (~6 min)")
    ap.add_argument("--keep-going", action="store_true", help="time even if a correctness check fails")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1 (CI)")
    args = ap.parse_args()
    t_start = time.time()
    if args.cpu_smoke:
        DEV, H = "cpu", 1  # one KV head: the interpreter runs every program in Python
        log(f"cpu smoke; torch {torch.__version__}, triton {triton.__version__}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
        ok = correctness(smoke=True)
        copy_bw, read_bw = bandwidths(wall_ms)
        out, dense_b = time_shape(1, 16, wall_ms, 0, 16)  # one block: the table's code path, not a measurement
        rows = report(1, 16, out, dense_b, copy_bw)
        parts.compress_timing(DEV, True, wall_ms, wall_ms, {1: 1.0}, read_bw, log)
        log(f"\n== summary (cpu smoke, {time.time() - t_start:.0f} s): {len(rows)} rows")
        log(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)
    props = torch.cuda.get_device_properties(0)
    card, l2 = props.name, props.L2_cache_size
    log(f"card: {card}, SMs {props.multi_processor_count}, L2 {l2 / 1e6:.0f} MB; torch {torch.__version__}, "
        f"triton {triton.__version__}")
    tag = card.replace("NVIDIA ", "").replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"quant_decode_{tag}.txt")
    ok = correctness(smoke=False, full=args.full_check)
    if not ok and not args.keep_going:
        log("\ncorrectness: FAIL (no timings; --keep-going times anyway)")
        _write(path)
        sys.exit(1)
    copy_bw, read_bw = bandwidths(graph_ms)
    rows, step = [], {}
    for B, ctx in QUICK if args.quick else SIZES:
        out, dense_b = time_shape(B, ctx, graph_ms, l2, T)
        rows += report(B, ctx, out, dense_b, copy_bw)
        if ctx == 32768:
            step[B] = out["balanced step"][0]
    for B in (1, 16):
        if B not in step:  # the amortization needs a measured step at B x 32K
            step[B] = time_shape(B, 32768, graph_ms, l2, T)[0]["balanced step"][0]
    parts.compress_timing(DEV, False, graph_ms, eager_ms, step, read_bw, log)
    if args.sweep:
        sweep(graph_ms, l2)
    log(f"\n== summary ({card}; {time.time() - t_start:.0f} s; copy {copy_bw:.0f} GB/s, read {read_bw:.0f} GB/s)")
    log(f"  {'B x ctx':>10s} {'method':24s} {'ms':>8s} {'x SDPA':>7s} {'GB/s':>6s} {'%copy':>6s} {'bytes x':>8s} {'%bytes x':>8s}")
    for B, ctx, name, ms, xs, gbs, pc, bx, fr in rows:
        log(f"  {f'{B}x{ctx // 1024}K':>10s} {name:24s} {ms:8.4f} {xs:7.2f} {gbs:6.0f} {pc:6.1f} {bx:8.2f} {fr:8.1f}")
    log(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    _write(path)
    sys.exit(0 if ok else 1)


def _write(path):
    with open(path, "w") as f:
        f.write("\n".join(LOG) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
