"""The Gluon cold-loop kernel (`spectral_kv/kernels/quant_decode_gluon.py`) vs the `tl` kernel.

    PYTHONPATH=/path/to/triton-3.6:. python benchmarks/gluon_decode.py --offline   # no GPU: sm_90 SASS
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gluon_decode.py [--quick]    # on the GPU (Triton 3.6)

``--offline`` compiles both kernels for sm_90 (and the Gluon kernel's byte-statistics variant of
`balanced`, against its float16 one) and prints registers, spills and the SASS opcode
histogram of their unit loops (the loop with the most HMMA), per 256 tokens of one KV head (the
`tl` kernel's unit is 256 tokens over 4 warps; the Gluon kernel's 8 / p_min chunks of 16 tokens on
one warp). The GPU mode checks first (exit 1 on failure): the Gluon partials against their torch
twin at 1 x 4K, then partials + a torch combine against `quant_decode_reference` (n_exact = 0) at
1 x 4K and 8 x 32K, for `balanced` (K4/V3), `max-compression` (K3/V2) and `balanced+byte` (balanced
with byte value statistics, ``value_stats="byte"``: the kernel's VBYTE variant; at 1 x 4K also a NaN
scale code against the twin), and the op's own Gluon path (``backend="gluon"``: the finish kernel
instead of the torch combine); then times (median of
`triton.testing.do_bench` over one CUDA graph of one call per input set, sets >= 3x the L2) the
Gluon partials, the op on its Gluon path, the `tl` op (``backend="triton"``) on the same cold
blocks (n_exact = 0; its partials + combine) and SDPA (flash) over the dense bf16 K/V of the same
context, at 1 x 4K, 8 x 32K and 16 x 32K.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402

from spectral_kv.codes import CodeLayout  # noqa: E402
from spectral_kv.kernels import quant_decode_gluon as QG  # noqa: E402
from spectral_kv.kernels import quant_decode_gluon_path as GP  # noqa: E402

LAYOUTS = {"balanced": (((128, 4),), ((128, 3),)), "max-compression": (((128, 3),), ((128, 2),))}
# the GPU mode also checks and times balanced with byte value statistics (quant_decode_bench.layouts)
CHECKED = tuple(LAYOUTS) + ("balanced+byte",)
T, KG, H, G, D = 512, 128, 8, 4, 128
CHECK = ((1, 4096), (8, 32768))  # (batch, context) of the correctness pass
TIME = ((1, 4096), (8, 32768), (16, 32768))


# ----------------------------------------------------------------------------- offline SASS
def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin", name)


def _sass_stats(compiled):
    """ptxas registers / spills and the opcode histogram of the unit loop (the loop with most HMMA)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    err = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", err))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    labels, ins, loops = {}, [], []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.search(r"/\*[0-9a-f]+\*/\s+(.*?);", line):
            if (t := re.search(r"BRA.*?(\.L_x_\d+)", m.group(1))) and labels.get(t.group(1), 1 << 30) < len(ins):
                loops.append((labels[t.group(1)], len(ins)))  # a backward branch closes a loop
            ins.append(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0].split(".")[0])
    lo, hi = max(loops, key=lambda L: ins[L[0]: L[1] + 1].count("HMMA"))
    return dict(regs=regs, spill_bytes=spill, loop=collections.Counter(ins[lo: hi + 1]), shared=compiled.metadata.shared)


def compile_gluon(kseg, vseg, d=D, g=G, maxnreg=None, value_stats="fp16"):
    """Compile the Gluon kernel for sm_90 (needs triton 3.6's gluon): `_sass_stats` + per-unit tokens.
    ``value_stats``: "fp16", or "byte" (uint8 scale code / int8 zero point, the ``VBYTE`` variant)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    kl, vl = CodeLayout(T, tuple((d if c == 128 else c, b) for c, b in kseg)), CodeLayout(T, tuple((d, b) for _, b in vseg))
    const = dict(QG.kernel_constants(kl, vl, KG, value_stats=value_stats), G=g)
    names = list(inspect.signature(QG.qd_cold_gluon_kernel.fn).parameters)
    vs_t, vz_t = ("*u8", "*i8") if value_stats == "byte" else ("*fp16", "*fp16")
    ptrs = dict(qk_ptr="*fp32", kc_ptr="*u8", ks_ptr="*fp16", kz_ptr="*fp16", vw_ptr="*i32", vs_ptr=vs_t,
                vz_ptr=vz_t, ncold_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32")
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "qk_scale" else "i64" if n[0] == "s" else "i32")
           for n in names}
    # what a launch specializes: pointers and the strides of real pools are multiples of 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptrs or sig[n] == "i64"}
    out = triton.compile(GluonASTSource(fn=QG.qd_cold_gluon_kernel, signature=sig, constexprs=const, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=maxnreg))
    return dict(_sass_stats(out), tokens=8 // const["P_BASE"] * QG.ROWS, warps=1)


def compile_tl(kseg, vseg):
    """The `tl` kernel as the op launches it (`quant_decode_compile.check`), its partial kernel's stats."""
    import quant_decode_compile as qc

    got, orig = [], qc.triton.compile
    qc.triton.compile = lambda *a, **k: got.append(orig(*a, **k)) or got[-1]
    try:
        qc.check(kseg, vseg, T=T, kg=KG, G=G, D=D)
    finally:
        qc.triton.compile = orig
    return dict(_sass_stats(got[0]), tokens=256, warps=4)


def compile_finish(d=D, dv=D, rot=True, g=G, te=68, dt="bf16", kernel="finish"):
    """Compile the Gluon path's finish kernel (``kernel="query"``: its query kernel;
    `quant_finish_triton`) for sm_90 with the constexprs `quant_decode_gluon_path` launches it
    with: ptxas's registers and spill bytes."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spectral_kv.kernels.quant_finish_triton import qd_finish_kernel

    from spectral_kv.kernels.quant_finish_triton import qd_query_kernel

    g_pad, ch = 16 if g <= 16 else 32, min(32, d)
    if kernel == "query":  # rotate_query's launch
        const = dict(G=g, G_PAD=g_pad, D_PAD=d, CH=ch)
        ptrs = dict(q_ptr=f"*{dt}", rk_ptr="*fp32", qk_ptr="*fp32")
        fn = qd_query_kernel
    else:
        const = dict(G=g, ROT_V=rot, DV=dv, DV_PAD=dv, G_PAD=g_pad, D_PAD=d, CH=ch,
                     BLOCK_E=32 if te >= 32 else 16, RB=max(16, min(128, 4096 // (dv if rot else ch))))
        ptrs = dict(q_ptr=f"*{dt}", rv_ptr="*fp32" if rot else f"*{dt}", ek_ptr=f"*{dt}", ev_ptr=f"*{dt}",
                    nexact_ptr="*i32", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=f"*{dt}")
        fn = qd_finish_kernel
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n == "qk_scale" else "i32" if n in ("H", "D", "DK", "S")
                                                     else "i64") for n in names}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4 if kernel == "query" else GP.FINISH_WARPS))
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(out.asm["ptx"])
    err = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
    return dict(regs=int(re.search(r"Used (\d+) registers", err).group(1)),
                spill_bytes=sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", err)))


def offline():
    keys = ("HMMA", "PRMT", "LOP3", "SHF", "IMAD", "LDG", "BAR", "STS", "LDS", "LDSM", "SHFL", "HMUL2", "FFMA", "FMUL", "MUFU")
    print(f"triton {triton.__version__}, sm_90; per 256 tokens of one KV head = warp-instructions of the unit loop "
          f"x warps x 256 / unit tokens")
    res = {}
    for name, (kseg, vseg) in LAYOUTS.items():
        for kind, fn in (("tl", compile_tl), ("gluon", compile_gluon)):
            r = res[name, kind] = fn(kseg, vseg)
            n = sum(r["loop"].values())
            per256 = n * r["warps"] * 256 // r["tokens"]
            print(f"{name:16s} {kind:6s} regs {r['regs']:3d} spill st+ld {r['spill_bytes']:4d} B shared {r['shared']:6d} B "
                  f"loop {n:5d} instr/thread/unit ({r['tokens']} tokens, {r['warps']} warps) = {per256} warp-instr per 256 tokens")
            print("    " + " ".join(f"{k} {r['loop'].get(k, 0)}" for k in keys))
            print("    all: " + str(dict(r["loop"].most_common())))
    # value_stats="byte" (uint8 scale code / int8 zero point per value token): the kernel's VBYTE variant
    fp, by = res["balanced", "gluon"], compile_gluon(*LAYOUTS["balanced"], value_stats="byte")
    n_fp, n_by = sum(fp["loop"].values()), sum(by["loop"].values())
    print(f"balanced+byte    gluon  regs {by['regs']:3d} spill st+ld {by['spill_bytes']:4d} B shared {by['shared']:6d} B "
          f"loop {n_by:5d} instr/thread/unit vs float16 statistics: regs {fp['regs']}, spills {fp['spill_bytes']} B, "
          f"loop {n_fp} ({100 * (n_by / n_fp - 1):+.1f}% instructions)")
    print("    all: " + str(dict(by["loop"].most_common())))
    for stats in ("fp16", "byte"):
        r = compile_gluon(((64, 4),), ((64, 3),), d=64, value_stats=stats)
        print(f"head_dim 64 balanced gluon ({stats} value statistics): regs {r['regs']} spills {r['spill_bytes']} "
              f"loop {sum(r['loop'].values())}")
    for d, rot in ((128, True), (128, False), (64, True)):
        r = compile_finish(d, d, rot)
        print(f"finish kernel head_dim {d} {'basis' if rot else 'identity'}: regs {r['regs']} spills {r['spill_bytes']} B")
    for d in (128, 64):
        r = compile_finish(d, kernel="query")
        print(f"query kernel head_dim {d}: regs {r['regs']} spills {r['spill_bytes']} B")


# ----------------------------------------------------------------------------- GPU
def gpu(timed=tuple(LAYOUTS)):
    import quant_decode_bench as qb
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from spectral_kv.kernels.quant_decode import layout_pairs, quant_decode, quant_decode_reference

    lays = {n: lay for n, lay in qb.layouts(T).items() if n in CHECKED}
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"triton {triton.__version__}, {torch.cuda.get_device_name()}")

    def inputs(name, B, ctx, seed=0, n_cold=None):
        x = qb.quant_inputs(lays[name], B, H, G, ctx // T, T, 1, n_cold=n_cold, n_exact=[0] * B, poison=True, seed=seed)
        # the op: (q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v,
        # n_exact, scaling, key_layout, value_layout, key_group); the Gluon partials take the query already in
        # the key basis (fp32 [B, Hq, Dk]) and leave acc in the value basis (`to_model_basis`)
        op = x["op"]
        kl, vl = CodeLayout(T, layout_pairs(op[14])), CodeLayout(T, layout_pairs(op[15]))
        q, rk = op[0], op[1]
        qf = q.float().view(B, H, G, D)
        qk = (qf if rk is None else qf @ rk.float().transpose(-1, -2))[..., : kl.kept].reshape(B, H * G, kl.kept)
        gl_args = (qk.contiguous(), op[3], op[4], op[5], op[6], op[7], op[8], op[9], op[13], kl, vl, op[16])
        return op, gl_args

    def _kept(op):
        return CodeLayout(T, layout_pairs(op[14])).kept

    def to_model_basis(out_cold, op):
        """[B, Hq, Dv] value-basis output -> [B, Hq, D] (what quant_decode_reference returns)."""
        rv = op[2]
        B_ = out_cold.shape[0]
        if rv is None:
            return torch.nn.functional.pad(out_cold, (0, D - out_cold.shape[-1]))
        o = out_cold.view(B_, H, G, -1) @ rv.float()[..., : out_cold.shape[-1], :]
        return o.reshape(B_, H * G, D)

    def check(key_width):
        ok = True
        print(f"== correctness, key k_width {key_width} (rel. Frobenius error; tolerance 1e-2: fp16 operands, bf16 query)")
        for name in CHECKED:
            for B, ctx in CHECK:
                NB = ctx // T
                op, ga = inputs(name, B, ctx, n_cold=[NB] * (B - 1) + [NB - 3] if B > 1 else None)
                m, l, acc, tps = QG.cold_partials(*ga, key_width=key_width)
                want = quant_decode_reference(*op)
                err = qb.rel(to_model_basis(QG.combine_partials(m, l, acc), op), want)
                line = f"  {name:16s} {B} x {ctx}: partials + torch combine vs quant_decode_reference {err:.2e}"
                if key_width == 8:  # the op's Gluon path (its finish kernel instead of the torch combine)
                    e_op = qb.rel(quant_decode(*op, backend="gluon"), want)
                    line += f"; op backend='gluon' {e_op:.2e}"
                    ok &= e_op < 1e-2
                if B == 1:
                    cpu = [t.cpu() if torch.is_tensor(t) else t for t in ga]
                    rm, rl, racc = QG.cold_partials_reference(*cpu, tps)
                    fin = torch.isfinite(rm)
                    e2 = max(qb.rel(m.cpu()[fin], rm[fin]), qb.rel(l.cpu(), rl), qb.rel(acc.cpu(), racc))
                    same_empty = torch.equal(torch.isinf(m.cpu()), ~fin)
                    line += f"; partials vs torch twin {e2:.2e}{'' if same_empty else ' EMPTY SPLITS DIFFER'}"
                    ok &= e2 < 1e-2 and same_empty
                if B == 1 and ga[5].dtype == torch.uint8:  # a NaN scale code (255) in use: NaN where the twin has it
                    vs = ga[5].clone()
                    vs[0, 1, 0, 77, 0] = 255
                    gn = ga[:5] + (vs,) + ga[6:]
                    nm, nl, nacc, _ = QG.cold_partials(*gn, tps=tps, key_width=key_width)
                    rn = QG.cold_partials_reference(*[t.cpu() if torch.is_tensor(t) else t for t in gn], tps)
                    same_nan = bool(torch.isnan(rn[2]).any()) and all(
                        torch.equal(torch.isnan(a.cpu()), torch.isnan(r)) for a, r in zip((nm, nl, nacc), rn))
                    line += f"; NaN scale code: {'NaN partials as the twin' if same_nan else 'NaN PARTIALS DIFFER'}"
                    ok &= same_nan
                ok &= err < 1e-2
                print(line, flush=True)
        return ok

    kw = 8
    if not check(kw):  # the probe's k_width 4 as a fallback: says whether k_width 8's lowering is the culprit
        kw = 4
        if not check(kw):
            print("FAILED: not timing")
            sys.exit(1)

    print("== timing (us per call, CUDA-graph replay; GB/s of the bytes each reads)")
    print(f"  {'shape':10s} {'method':44s} {'us':>8s} {'GB/s':>7s} {'x SDPA':>7s} {'x tl':>6s}")
    for B, ctx in TIME:
        NB = ctx // T
        dense = B * H * ctx * D * 2 * 2
        sets = qb.n_sets(dense, l2, cap=8)
        kv = [(torch.randn(B, H * G, 1, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16),
               torch.randn(B, H, ctx, D, device="cuda", dtype=torch.bfloat16)) for _ in range(sets)]

        def sdpa(d):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(*d, enable_gqa=True)

        t_sd = qb.graph_ms([lambda d=d: sdpa(d) for d in kv]) * 1e3
        del kv
        print(f"  {B} x {ctx // 1024}K   {'SDPA flash (dense bf16)':44s} {t_sd:8.1f} {dense / t_sd / 1e3:7.0f} {1.0:7.2f}")
        for name in timed:
            nbytes = qb.quant_bytes(lays[name], B, NB, T, 0)
            xs = [inputs(name, B, ctx, seed=s) for s in range(qb.n_sets(nbytes, l2))]
            t_tl = qb.graph_ms([lambda o=o: quant_decode(*o, backend="triton") for o, _ in xs]) * 1e3
            # the op's own Gluon path (backend="auto" on CUDA): query rotation + partials + finish kernel
            t_op = qb.graph_ms([lambda o=o: quant_decode(*o, backend="gluon") for o, _ in xs]) * 1e3
            t_gp = qb.graph_ms([lambda a=a: QG.cold_partials(*a, key_width=kw) for _, a in xs]) * 1e3
            t_gc = qb.graph_ms([lambda a=a: QG.combine_partials(*QG.cold_partials(*a, key_width=kw)[:3]) for _, a in xs]) * 1e3
            # the path's other two launches alone: the query kernel, and the finish kernel on fixed partials
            t_q = qb.graph_ms([lambda o=o: GP.rotate_query(o[0], o[1], _kept(o)) for o, _ in xs]) * 1e3
            parts = [QG.cold_partials(*a, key_width=kw)[:3] for _, a in xs]
            # the finish with the bench's exact tail (4 sinks + 64 hot) as in the op's real calls
            ex = [(torch.randn(B, H, 68, D, device="cuda", dtype=torch.bfloat16),
                   torch.randn(B, H, 68, D, device="cuda", dtype=torch.bfloat16)) for _ in xs]
            ne = torch.full((B,), 68, dtype=torch.int32, device="cuda")
            t_f = qb.graph_ms([lambda o=o, p=p, e=e: GP.finish(o[0], o[2], *p, *e, ne, o[13])
                               for (o, _), p, e in zip(xs, parts, ex)]) * 1e3
            if name == "balanced":  # the query kernel's knobs (key channels per program, warps)
                for qch, qw in ((16, 1), (16, 2), (32, 2), (64, 4), (128, 4), (32, 1)):
                    t = qb.graph_ms([lambda o=o: GP.rotate_query(o[0], o[1], _kept(o), ch=qch, num_warps=qw)
                                     for o, _ in xs]) * 1e3
                    print(f"  {B} x {ctx // 1024}K   query sweep ch {qch} warps {qw}: {t:.1f} us (default {t_q:.1f})",
                          flush=True)
            if name == "balanced":  # the finish kernel's tile knobs (rows per merge step, exact block, warps)
                for rb, be, warps in ((32, 32, 4), (64, 32, 8), (64, 64, 8), (32, 64, 8), (128, 64, 8), (64, 128, 8)):
                    GP.FINISH_WARPS, keep = warps, GP.FINISH_WARPS
                    try:
                        t = qb.graph_ms([lambda o=o, p=p, e=e: GP.finish(o[0], o[2], *p, *e, ne, o[13], rb=rb, block_e=be)
                                         for (o, _), p, e in zip(xs, parts, ex)]) * 1e3
                        print(f"  {B} x {ctx // 1024}K   finish sweep rb {rb} block_e {be} warps {warps}: {t:.1f} us "
                              f"(default {t_f:.1f})", flush=True)
                    except Exception as exc:  # a knob that does not compile is a result too
                        print(f"  finish sweep rb {rb} block_e {be} warps {warps}: {type(exc).__name__} {exc}"[:300])
                    finally:
                        GP.FINISH_WARPS = keep
            del parts, ex
            rows = [(f"{name} tl op (partials+combine)", t_tl), (f"{name} gluon partials", t_gp),
                    (f"{name} gluon + torch combine", t_gc), (f"{name} query kernel alone", t_q),
                    (f"{name} finish kernel alone (68 exact)", t_f), (f"{name} gluon op (rotation+partials+finish)", t_op)]
            if name == "balanced" and B > 1:  # fewer registers, more warps per SM (some spills)
                for cap in (224, 200):
                    t = qb.graph_ms([lambda a=a: QG.cold_partials(*a, max_registers=cap, key_width=kw) for _, a in xs]) * 1e3
                    rows.append((f"{name} gluon partials maxnreg {cap}", t))
            for meth, t in rows:
                print(f"  {B} x {ctx // 1024}K   {meth:44s} {t:8.1f} {nbytes / t / 1e3:7.0f} {t_sd / t:7.2f} {t_tl / t:6.2f}",
                      flush=True)
            del xs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--offline", action="store_true", help="compile for sm_90 and count SASS (no GPU)")
    ap.add_argument("--quick", action="store_true", help="time balanced and balanced+byte only (checks all three)")
    args = ap.parse_args()
    offline() if args.offline else gpu(("balanced", "balanced+byte") if args.quick else CHECKED)
