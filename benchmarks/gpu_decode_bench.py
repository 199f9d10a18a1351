"""GPU benchmark: fused spectral decode vs SDPA over dense bf16 K/V, plus the capturable rSVD.

Run on a CUDA machine from the repo root:
    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/gpu_decode_bench.py [--out DIR] [--quick]

Order: correctness (kernel vs fp32 reference on fresh random inputs, full opcheck), then a
tuning sweep of the kernel's knobs, then the timing table, then rSVD. Times are medians.
"main" times replay one CUDA graph holding one call per input set, with enough sets
(like layers) that the working set exceeds L2, and report per call; "eager" is
triton.testing.do_bench (median) on a single input set.

Then compression (benchmarks/bench_compress.py: triton_rsvd's CUDA graph vs torch.linalg.svd,
error vs exact SVD, amortized cost) and end to end (benchmarks/bench_e2e.py: a Mistral-7B-shaped
model with random bf16 weights, generate with SpectralCache + fused vs DynamicCache + SDPA), and
one summary table. ``--cpu-smoke`` runs the compression and end-to-end code paths at tiny sizes
on the CPU (tests/test_gpu_bench_smoke.py), so CI catches breakage of this script.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F


def _load(name):
    try:
        return importlib.import_module(f"spectral_kv.kernels.{name}")
    except Exception as exc:  # package __init__ may pull deps the GPU box lacks
        print(f"[warn] package import of {name} failed ({exc!r}); loading file directly")
        path = os.path.join(os.path.dirname(__file__), "..", "spectral_kv", "kernels", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"_skv_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


import importlib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_compress, bench_e2e
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # spectral_kv

fd = _load("fused_decode")
svd_decode_inputs = _load("inputs").svd_decode_inputs
rs = _load("rsvd")
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

DEV = "cuda"
LOG = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s)
    LOG.append(s)


# ----------------------------------------------------------------------------- inputs
def make_inputs(B, H, G, D, T, NB, Te, rk, rv, dtype, n_cold=None, n_exact=None, poison=True, seed=0):
    n_cold = n_cold if n_cold is not None else [NB] * B
    n_exact = n_exact if n_exact is not None else [Te] * B
    return svd_decode_inputs(B, H, G, D, T, NB, Te, rk, rv, dtype, seed, n_cold, n_exact, DEV, poison, decay=True)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- correctness
def correctness():
    log("== correctness: fused kernel vs fp32 reference (fresh random inputs, garbage = NaN/inf)")
    cases = [
        # B, H, G, D, T, NB, Te, rk, rv, dtype, n_cold, n_exact
        (1, 1, 1, 16, 16, 0, 1, 4, 8, torch.float32, None, None),
        (3, 2, 3, 64, 32, 3, 17, 5, 7, torch.float16, [3, 1, 0], [17, 3, 0]),
        (2, 8, 4, 128, 512, 5, 68, 16, 32, torch.bfloat16, [5, 2], [68, 30]),
        (5, 8, 4, 128, 512, 9, 68, 16, 32, torch.bfloat16, [9, 0, 4, 9, 1], [68, 68, 1, 0, 5]),
        (2, 4, 8, 64, 256, 4, 100, 24, 40, torch.float32, [4, 3], [100, 99]),
        (16, 8, 4, 128, 512, 64, 68, 16, 32, torch.bfloat16, None, None),
    ]
    ok = True
    for i, (B, H, G, D, T, NB, Te, rk, rv, dt, nc, ne) in enumerate(cases):
        t = make_inputs(B, H, G, D, T, NB, Te, rk, rv, dt, nc, ne, seed=100 + i)
        ref = fd.fused_decode_reference(**t)
        errs = []
        for knobs in ({}, dict(blocks_per_split=1, block_t=min(T, 256), pv_half=1), dict(blocks_per_split=3, num_warps=8)):
            out = fd.fused_decode(**t, **knobs)
            torch.cuda.synchronize()
            e = rel(out, ref) if torch.isfinite(out).all() else float("nan")
            errs.append(e)
        tol = 1e-2 if dt != torch.float32 else 5e-3  # tf32 dots (~1e-3) + low-precision output
        good = all(e == e and e < tol for e in errs)
        ok &= good
        log(f"  case {i}: B={B} H={H} G={G} D={D} T={T} NB={NB} Te={Te} rk={rk} rv={rv} {str(dt)[6:]}"
            f" rel_err={['%.2e' % e for e in errs]} tol={tol:g} {'OK' if good else 'FAIL'}")
    t = make_inputs(1, 2, 3, 64, 32, 2, 5, 8, 8, torch.bfloat16, poison=False, seed=7)
    args = tuple(t[k] for k in ("q", "k_coeffs", "k_scales", "k_basis", "v_coeffs", "v_scales", "v_basis",
                                "n_cold", "exact_k", "exact_v", "n_exact", "scaling"))
    try:
        res = torch.library.opcheck(torch.ops.spectral_kv.fused_decode.default, args)
        log(f"  opcheck (all default utils, CUDA): {res}")
        ok &= all(v == "SUCCESS" for v in res.values())
    except Exception as exc:
        ok = False
        log(f"  opcheck FAILED: {exc!r}"[:2000])
    try:
        cf = torch.compile(lambda *a: fd.fused_decode(*a), fullgraph=True)
        e = rel(cf(*args), fd.fused_decode_reference(*args))
        log(f"  torch.compile(fullgraph) of the op: rel_err={e:.2e}")
    except Exception as exc:
        log(f"  torch.compile of the op failed: {exc!r}"[:1000])
    log(f"  correctness overall: {'PASS' if ok else 'FAIL'}")
    return ok


# ----------------------------------------------------------------------------- timing helpers
def graph_time(fns, reps=20):
    """Per-call ms of replaying one graph that calls each fn once (fns rotate input sets)."""
    from graph_capture import capture  # benchmarks/ (sys.path above), imported where used like bench_e2e

    g = capture(fns)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth():
    n = 1 << 29  # 1 GiB of bytes
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6  # GB/s, read + write


# ----------------------------------------------------------------------------- decode table
H, G, D, T, RK, RV, TE = 8, 4, 128, 512, 16, 32, 68  # TE = 64 hot + 4 sinks
SIZES = [(1, 4096), (1, 32768), (16, 32768), (4, 131072)]


def sizes_bytes(B, NB):
    cold = B * H * NB * (T * (RK + RV) + (RK + RV) * (4 + 2 * D))
    exact = B * H * TE * D * 2 * 2
    dense = B * H * (NB * T + TE) * D * 2 * 2
    qo = 2 * B * H * G * D * 2
    return cold + exact + qo, dense + qo


def sweep(t):
    best = None
    rows = []
    for bt in (256, 512):
        for ph in (0, 1):
            for ns in (2, 3):
                for bps in (2, 4, 8, 16):
                    kn = dict(blocks_per_split=bps, block_t=bt, num_warps=4, num_stages=ns, pv_half=ph)
                    try:
                        ms = bench(lambda: fd.fused_decode(**t, **kn))
                    except Exception as exc:
                        rows.append((kn, float("nan")))
                        log(f"    knobs {kn} failed: {exc!r}"[:300])
                        break
                    rows.append((kn, ms))
                    if best is None or ms < best[1]:
                        best = (kn, ms)
    return best, rows


def decode_table(copy_bw, quick):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = []
    for B, ctx in SIZES:
        NB = ctx // T
        comp_bytes, dense_bytes = sizes_bytes(B, NB)
        n_sets = max(1, min(32, math.ceil(3 * l2 / comp_bytes)))
        n_sets_d = max(1, min(32, math.ceil(3 * l2 / dense_bytes)))
        sets = [make_inputs(B, H, G, D, T, NB, TE, RK, RV, torch.bfloat16, poison=False, seed=s)
                for s in range(n_sets)]
        L = NB * T + TE
        dense = []
        for s in range(n_sets_d):
            gq = torch.Generator(device=DEV).manual_seed(1000 + s)
            dense.append((torch.randn(B, H * G, 1, D, generator=gq, device=DEV, dtype=torch.bfloat16),
                          torch.randn(B, H, L, D, generator=gq, device=DEV, dtype=torch.bfloat16),
                          torch.randn(B, H, L, D, generator=gq, device=DEV, dtype=torch.bfloat16)))
        sdpa = lambda d: F.scaled_dot_product_attention(d[0], d[1], d[2], enable_gqa=True)
        log(f"\n== B={B} ctx={ctx}: NB={NB} blocks + {TE} exact; compressed {comp_bytes/1e6:.1f} MB vs "
            f"dense {dense_bytes/1e6:.1f} MB ({dense_bytes/comp_bytes:.2f}x); sets: comp {n_sets}, dense {n_sets_d}")
        best, rows = (None, [])
        if not quick and B > 1:  # eager sweeps at B=1 only measure launch overhead
            best, rows = sweep(sets[0])
            for kn, ms in sorted(rows, key=lambda r: r[1])[:5]:
                log(f"    sweep top: {kn} {ms*1e3:.1f} us")
        variants = {"fused(default)": {}, "fused(pv_half)": dict(pv_half=1)}
        if best is not None:
            variants["fused(best)"] = best[0]
        out = {}
        out["sdpa"] = (graph_time([lambda d=d: sdpa(d) for d in dense]), bench(lambda: sdpa(dense[0])), dense_bytes)
        for name, kn in variants.items():
            out[name] = (graph_time([lambda t=t: fd.fused_decode(**t, **kn) for t in sets]),
                         bench(lambda: fd.fused_decode(**sets[0], **kn)), comp_bytes)
        try:
            gtr = graph_time([lambda t=t: fd.fused_decode_reference(**t) for t in sets[:4]], reps=5)
        except Exception as exc:
            log(f"    reference graph capture failed: {exc!r}"[:300])
            gtr = float("nan")
        out["torch reference"] = (gtr, bench(lambda: fd.fused_decode_reference(**sets[0])), comp_bytes)
        sd = out["sdpa"][0]
        log(f"  {'method':16s} {'graph ms':>9s} {'eager ms':>9s} {'GB/s':>7s} {'x SDPA':>7s} {'%copy':>6s}")
        for name, (gms, ems, nbytes) in out.items():
            gbs = nbytes / gms / 1e6
            log(f"  {name:16s} {gms:9.4f} {ems:9.4f} {gbs:7.0f} {sd/gms:7.2f} {100*gbs/copy_bw:6.1f}")
        results.append((B, ctx, out, best))
        del sets, dense
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- rSVD
def rsvd_bench():
    log("\n== rSVD: one 512-token block for 32 layers x 8 KV heads: x [256, 512, 128] fp32")
    N, Tn, Dn = 256, 512, 128
    g = torch.Generator(device=DEV).manual_seed(0)
    U = torch.linalg.qr(torch.randn(N, Tn, Dn, generator=g, device=DEV)).Q
    V = torch.linalg.qr(torch.randn(N, Dn, Dn, generator=g, device=DEV)).Q
    s = 0.93 ** torch.arange(Dn, device=DEV, dtype=torch.float32) * 10
    x = (U * s) @ V.transpose(1, 2) + 0.01 * torch.randn(N, Tn, Dn, generator=g, device=DEV)
    torch.cuda.synchronize()
    t0 = time.time()
    sv = torch.linalg.svdvals(x)
    torch.cuda.synchronize()
    log(f"  (svdvals once: {time.time()-t0:.3f} s)")
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    full = torch.linalg.svd(x, full_matrices=False)
    b.record()
    b.synchronize()
    svd_ms = a.elapsed_time(b)
    a.record()
    full = torch.linalg.svd(x, full_matrices=False)
    b.record()
    b.synchronize()
    svd_ms = min(svd_ms, a.elapsed_time(b))
    for r in (16, 32):
        opt = sv[:, r:].pow(2).sum(-1).sqrt()
        omega = torch.randn(N, Dn, r + 8, generator=g, device=DEV)
        c, bb = rs.randomized_svd_lowrank(x, r, sketch=omega)
        cr, br = rs.randomized_svd_lowrank_reference(x, r, sketch=omega)
        ratio = ((x - c @ bb).norm(dim=(1, 2)) / opt)
        ratio_r = ((x - cr @ br).norm(dim=(1, 2)) / opt)
        orth = (bb @ bb.transpose(1, 2) - torch.eye(r, device=DEV)).abs().max().item()
        eager = bench(lambda: rs.randomized_svd_lowrank(x, r, sketch=omega))
        ref_ms = bench(lambda: rs.randomized_svd_lowrank_reference(x, r, sketch=omega))
        try:
            gms = graph_time([lambda: rs.randomized_svd_lowrank(x, r, sketch=omega)], reps=10)
        except Exception as exc:
            log(f"  graph capture failed: {exc!r}"[:400])
            gms = float("nan")
        log(f"  rank {r}: err/opt max {ratio.max().item():.4f} mean {ratio.mean().item():.4f} "
            f"(reference twin max {ratio_r.max().item():.4f}); basis orth err {orth:.1e}")
        log(f"    capturable rSVD: graph {gms:.3f} ms, eager {eager:.3f} ms; reference (qr+svd) {ref_ms:.3f} ms; "
            f"torch.linalg.svd full {svd_ms:.1f} ms -> {svd_ms/gms:.1f}x faster (graph)")
    try:
        m = torch.randn(N, 24, 24, device=DEV)
        m = m @ m.transpose(1, 2)
        gr = torch.cuda.CUDAGraph()
        torch.linalg.eigh(m)
        torch.cuda.synchronize()
        with torch.cuda.graph(gr):
            torch.linalg.eigh(m)
        log("  note: torch.linalg.eigh DID capture in a CUDA graph here")
    except Exception as exc:
        log(f"  note: torch.linalg.eigh cannot be captured: {str(exc)[:160]!r}")
    torch.cuda.synchronize()


def compression_and_e2e(device, smoke):
    """Compression timing, end-to-end generate, amortized compression cost; returns (ok, summary rows)."""
    import bench_compress as bc
    import bench_e2e as be

    log("\n== compression: triton_rsvd (CUDA graph) vs torch.linalg.svd" + (" [cpu smoke]" if smoke else ""))
    n, t, d = (8, 64, 32) if smoke else (256, 512, 128)
    log(f"  one block for 32 layers x 8 KV heads: {n} matrices [{t}, {d}] fp32 in one call")
    ok = True
    # The Triton Jacobi is optional (off by default): its check is reported, not required.
    if device == "cuda" and not bc.jacobi_check(device, log):
        from spectral_kv.compressors import TritonRSVD

        TritonRSVD.triton_jacobi = False
        log("  -> optional Triton Jacobi inaccurate: not used (torch-ops Jacobi, the default)")
    if device == "cuda":
        bc.jacobi_opcheck(device, log)  # the optional Triton Jacobi (off by default): reported only
    crow, ok2 = bc.headline(n, t, d, device, 3 if smoke else 20, log, ranks=(4, 8) if smoke else (16, 32))
    ok &= ok2
    log("\n== end to end: generate, SpectralCache(fused, triton_rsvd) vs DynamicCache + SDPA")
    e2e_ok, erows = be.run(device, smoke, log)
    ok &= e2e_ok
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()  # the 7B model's blocks stay reserved otherwise (OOM below)
    summary = [f"compress {n}x[{t},{d}] rank {r}: triton_rsvd {g:.3f} ms vs svd {s_:.1f} ms ({s_ / g:.0f}x), "
               f"err/exact {e:.4f} (goal < 2 ms, <= 1.05)" for r, g, _, s_, e in crow]
    base = {(b, c): tps for m, b, c, tps, _ in erows if m.startswith("dynamic")}
    for m, b, c, tps, gb in erows:
        if not m.startswith("spectral"):
            continue
        # Amortized: every 512 decode steps each layer compresses one block per row (K and V).
        blk, layers = (32, 2) if smoke else (512, 32)
        comp_ms = bc.per_block_all_layers_ms(b, layers, 2 if smoke else 8, blk, d, 4 if smoke else 16,
                                             8 if smoke else 32, device, 2 if smoke else 5)
        step_ms = 1e3 * b / tps
        amort = 100 * comp_ms / (blk * step_ms + comp_ms)
        vs = f"{tps / base[(b, c)]:.2f}x DynamicCache" if (b, c) in base else "DynamicCache does not fit"
        summary.append(f"e2e {m} B={b} ctx={c}: {tps:.1f} tok/s, {vs}; cache {gb:.2f} GB; compression amortized "
                       f"{amort:.2f}% of decode (goal < 5%)")
    return ok, summary


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="skip the knob sweep")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes on the CPU: compression + end-to-end code paths only (for CI)")
    args = ap.parse_args()
    if args.cpu_smoke:
        DEV = "cpu"
        log(f"cpu smoke run; torch {torch.__version__}")
        ok, summary = compression_and_e2e("cpu", smoke=True)
        log("\n== summary\n  " + "\n  ".join(summary))
        log(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
        sys.exit(0 if ok else 1)
    props = torch.cuda.get_device_properties(0)
    card = props.name
    log(f"card: {card}, SMs {props.multi_processor_count}, L2 {props.L2_cache_size/1e6:.0f} MB; "
        f"torch {torch.__version__}, triton {triton.__version__}")
    t_start = time.time()
    ok = correctness()
    bw = copy_bandwidth()
    log(f"\n== device-to-device copy: {bw:.0f} GB/s (read + write)")
    results = decode_table(bw, args.quick)
    rsvd_bench()
    try:
        ok2, summary = compression_and_e2e("cuda", smoke=False)
    except Exception:  # keep the decode results and write the file; the traceback says what broke
        import traceback

        log(traceback.format_exc()[-3000:])
        ok2, summary = False, ["compression / end to end: FAILED (traceback above)"]
    ok &= ok2
    dec = []
    for B, ctx, out, _ in results:
        sd = out["sdpa"][0]
        fused = min(v[0] for k, v in out.items() if k.startswith("fused"))
        dec.append(f"decode B={B} ctx={ctx}: SDPA {sd * 1e3:.1f} us, naive torch spectral "
                   f"{out['torch reference'][0] * 1e3:.1f} us, fused {fused * 1e3:.1f} us -> {sd / fused:.2f}x SDPA")
    log(f"\n== summary ({card}, {time.time() - t_start:.0f} s)\n  " + "\n  ".join(dec + summary))
    log(f"\ncorrectness: {'PASS' if ok else 'FAIL'}")
    tag = card.replace("NVIDIA ", "").replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"gpu_decode_{tag}.txt")
    with open(path, "w") as f:
        f.write("\n".join(LOG) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
