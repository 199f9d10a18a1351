"""Where the time of one graphed decode step goes: per-kernel GPU time of `StaticDecoder` steps.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/step_profile.py --out DIR \
        [--points mistral7b:8:32768,mistral7b:1:32768] [--presets balanced,fast]
    PYTHONPATH=. python benchmarks/step_profile.py --cpu-smoke   # the code path on a tiny model

The model and the filled caches are `e2e_decode.py`'s (random bf16 weights, every layer holding
the bytes of a real cache of that length). Per point and preset: `StaticDecoder` decodes
``--steps`` tokens under `torch.profiler` (CUDA activity: CUPTI records the kernels a CUDA graph
replays); kernel times are summed by name and divided by the steps (the one eager warm-up step
and the capture are in the window too: ~1 / steps of each row). Printed beside them: the step's
median time (CUDA events, `StaticDecoder.record_step_times`), the GPU-busy share of it (sum of
kernel times / step: below ~100% the step waits on launches or the host), and per class the
bytes it must read and the bandwidth that implies:

* ``gemm``: cuBLAS/cutlass/nvjet kernels; they must read the weights once per step;
* ``attention``: the fused decode kernels (quantized or SVD) and their combine; they must read
  the compressed cache;
* ``other``: everything else (norms, RoPE, elementwise, the exact-tail writes, copies).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from spectral_kv import SpectralConfig, StaticDecoder  # noqa: E402

from bench_e2e import build_model, weight_bytes  # noqa: E402
from e2e_decode import cache_bytes, fill_spectral, model_config, read_bandwidth  # noqa: E402

LOG: list[str] = []


def log(*a) -> None:
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.append(s)


ATTN = ("qd_partial", "qd_combine", "qd_cold_gluon", "qd_finish", "fused_decode", "_fd_", "quant_decode")
GEMM = ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "splitk")


def kernel_class(name: str) -> str:
    low = name.lower()
    if any(a in low for a in ATTN):
        return "attention"
    if any(g in low for g in GEMM):
        return "gemm"
    return "other"


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    """{kernel name: (total µs, calls)} of the GPU kernels in a finished profile."""
    out: dict[str, list] = {}
    for e in prof.events():
        dev_type = getattr(e, "device_type", None)
        if dev_type is None or "CUDA" not in str(dev_type):
            continue
        us = getattr(e, "device_time", None)
        if us is None:
            us = e.cuda_time
        acc = out.setdefault(e.name, [0.0, 0])
        acc[0] += us
        acc[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def profile_point(model, preset, batch, ctx, steps, wb, read_bw, cpu):
    skcfg = SpectralConfig.preset(preset, verbose=False)
    if skcfg.compressor == "exact_svd":
        skcfg = skcfg.replace(compressor="triton_rsvd")
    cache = fill_spectral(model, skcfg, batch, ctx)
    nbytes = cache_bytes(cache)
    decoder = StaticDecoder(model, cache, record_step_times=not cpu)
    ids = torch.ones(batch, 1, dtype=torch.long, device=model.device)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([] if cpu else [torch.profiler.ProfilerActivity.CUDA])
    with torch.profiler.profile(activities=acts) as prof:
        decoder.generate_from_cache(ids, max_new_tokens=steps)
    step = statistics.median(decoder.step_ms[2:]) if decoder.step_ms[2:] else float("nan")
    times = kernel_times(prof)
    per_step = sorted(((us / steps, n / steps, name) for name, (us, n) in times.items()), reverse=True)
    busy = sum(us for us, _, _ in per_step)
    log(f"\n## {preset} StaticDecoder, B={batch} ctx={ctx}: step {step:.2f} ms (median), kernels {busy / 1e3:.2f} ms "
        f"per step = {busy / 1e3 / step:.0%} GPU-busy; cache {nbytes / 1e9:.2f} GB, weights {wb / 1e9:.2f} GB")
    classes: dict[str, list] = {}
    for us, n, name in per_step:
        c = classes.setdefault(kernel_class(name), [0.0, 0.0])
        c[0] += us
        c[1] += n
    must = {"gemm": wb, "attention": nbytes, "other": 0}
    log(f"  {'class':10s} {'ms/step':>8s} {'launches':>8s} {'% step':>7s} {'must read GB':>12s} {'GB/s':>7s} "
        f"{'% read BW':>9s}")
    for c, (us, n) in sorted(classes.items(), key=lambda kv: -kv[1][0]):
        gbs = must[c] / (us * 1e-6) / 1e9 if must[c] and us else float("nan")
        log(f"  {c:10s} {us / 1e3:8.3f} {n:8.0f} {100 * us / 1e3 / step:6.1f}% {must[c] / 1e9:12.2f} {gbs:7.0f} "
            f"{100 * gbs / read_bw:8.0f}%")
    log(f"  top kernels (µs per step, launches per step):")
    for us, n, name in per_step[:25]:
        log(f"    {us:9.1f} {n:6.1f}  [{kernel_class(name):9s}] {name[:110]}")
    del cache, decoder
    return {"preset": preset, "batch": batch, "ctx": ctx, "step_ms": step, "kernel_ms": busy / 1e3,
            "classes": {c: v[0] / 1e3 for c, v in classes.items()}, "cache_bytes": nbytes}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--points", default="mistral7b:8:32768,mistral7b:1:32768")
    p.add_argument("--presets", default="balanced,fast")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args(argv)
    cpu = a.cpu_smoke
    device = torch.device("cpu" if cpu else "cuda")
    points = [("tiny", 2, 600)] if cpu else [(s, int(b), int(c)) for s, b, c in (x.split(":") for x in a.points.split(","))]
    read_bw = read_bandwidth(device)[0] if not cpu else float("nan")
    log(f"# step profile: {torch.cuda.get_device_name() if not cpu else 'cpu'}, torch {torch.__version__}; "
        f"read bandwidth {read_bw:.0f} GB/s")
    rows, models = [], {}
    for shape, batch, ctx in points:
        if shape not in models:
            models.clear()
            torch.cuda.empty_cache() if not cpu else None
            m = build_model(model_config(shape, tiny=cpu), device, torch.float32 if cpu else torch.bfloat16)
            m.config._attn_implementation = "spectral_kv"
            models[shape] = m
        model = models[shape]
        for preset in a.presets.split(","):
            rows.append(profile_point(model, preset, batch, ctx, 3 if cpu else a.steps, weight_bytes(model), read_bw, cpu))
            torch.cuda.empty_cache() if not cpu else None
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        card = "cpu" if cpu else torch.cuda.get_device_name().replace(" ", "_")
        with open(os.path.join(a.out, f"step_profile_{card}.txt"), "w") as f:
            f.write("\n".join(LOG) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
