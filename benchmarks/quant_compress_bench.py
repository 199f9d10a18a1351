"""The fused compression op's part of `benchmarks/quant_decode_bench.py` (imported from there):
its correctness against the torch twin and its timing, amortized over the decode steps a block
lasts. Helpers, not a script."""
from __future__ import annotations

import torch

from spectral_kv.compressors import COMPRESSORS
from spectral_kv.config import SpectralConfig
from spectral_kv.kernels.quant_compress import quant_compress, quant_compress_reference

LAYERS, KV_HEADS, D, T = 32, 8, 128, 512
WEIGHT_BYTES = 14.5e9  # Mistral-7B in bf16: read once per decode step


def _compressors(name, t):
    cfg = SpectralConfig.preset(name, block_size=t, hot_buffer_size=min(64, t // 2))
    return [COMPRESSORS[cfg.compressor_name(r)](cfg, r, cfg.rank(r)) for r in ("keys", "values")]


def _args(comp, x):
    n, t, d = x.shape
    layout = [v for seg in comp.code_layout(d, t).segments for v in seg]
    return x, comp.rotation_on(d, x.device), layout, comp.role, min(comp.group, t)


def compress_correctness(dev, smoke, log):
    """Kernel vs twin for the preset layouts (and without a rotation, which must be bit-identical);
    on CUDA also the compressor's own path and a CUDA-graph replay."""
    log("  -- fused compression (kernels.quant_compress) vs its torch twin")
    t, n = (16, 2) if smoke else (T, 64)
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(n, t, D, generator=g, device=dev) * torch.linspace(0.1, 4, D, device=dev)).bfloat16()
    ok = True
    for name in ("balanced", "max-compression"):
        for comp in _compressors(name, t):
            a = _args(comp, x)
            got, want = quant_compress(*a), quant_compress_reference(*a)
            lay = comp.code_layout(D, t)
            dc = (lay.unpack(got[0]).int() - lay.unpack(want[0]).int()).abs()
            ds = max(((u.float() - v.float()).abs() / v.float().abs().clamp_min(2**-14)).max().item()
                     for u, v in zip(got[1:], want[1:]))
            plain = quant_compress(x, None, *a[2:]), quant_compress_reference(x, None, *a[2:])
            same = all(torch.equal(u, v) for u, v in zip(*plain))
            good = dc.max().item() <= 1 and dc.float().mean().item() < 1e-3 and ds <= 2**-10 and same
            if dev == "cuda":
                via = comp.compress(x)  # the compressor must take the fused op on CUDA
                good &= all(torch.equal(via[k], v) for k, v in zip(("codes", "scale", "zero"), got))
                gr = torch.cuda.CUDAGraph()
                torch.cuda.synchronize()
                with torch.cuda.graph(gr):
                    cap = quant_compress(*a)
                gr.replay()
                torch.cuda.synchronize()
                good &= all(torch.equal(u, v) for u, v in zip(cap, got))
            ok &= good
            log(f"    {name:15s} {comp.role:6s}: codes off by one {100 * dc.float().mean().item():.4f}% (max {dc.max().item()}), "
                f"stats max rel diff {ds:.1e}, no rotation bit-identical {same}{', compressor + CUDA graph == op' if dev == 'cuda' else ''}"
                f" {'OK' if good else 'FAIL'}")
    return ok


def compress_timing(dev, smoke, timer, eager, step_ms, read_bw, log):
    """One block for every layer and KV head at batch B (keys and values, ``balanced``), fused op
    (``timer``: CUDA graph) vs torch twin (``eager``); amortized over the ``block_size`` decode
    steps a block lasts. ``step_ms``:
    {B: measured ms of one layer's decode attention at B x 32K}."""
    layers, heads, t = (1, 1, 16) if smoke else (LAYERS, KV_HEADS, T)
    log(f"\n== fused compression: one {t}-token block for {layers} layers x {heads} KV heads, balanced (K4/V3 Hadamard)")
    kc, vc = _compressors("balanced", t)
    weights_ms = WEIGHT_BYTES / read_bw / 1e6
    for b, layer_ms in sorted(step_ms.items()):
        n = layers * heads * b
        g = torch.Generator(device=dev).manual_seed(b)
        xk = torch.randn(n, t, D, generator=g, device=dev).bfloat16()
        xv = torch.randn(n, t, D, generator=g, device=dev).bfloat16()
        fused = timer([lambda: (quant_compress(*_args(kc, xk)), quant_compress(*_args(vc, xv)))])
        twin = eager([lambda: (quant_compress_reference(*_args(kc, xk)), quant_compress_reference(*_args(vc, xv)))])
        attn = layers * layer_ms  # attention only: every layer's measured decode step
        log(f"  B={b}: {n} blocks per role; fused {fused:.3f} ms (graph), torch twin {twin:.3f} ms (eager) ({twin / fused:.1f}x)")
        for what, step in (("attention-only step", attn), ("step + Mistral-7B weights at the read bandwidth", attn + weights_ms)):
            log(f"    amortized over {t} decode steps of {step:.2f} ms ({what}): "
                f"{100 * fused / (t * step):.3f}% (goal < 3%)")
        del xk, xv
