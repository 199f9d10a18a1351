"""Compression part of gpu_decode_bench.py: `triton_rsvd` (CUDA graph) vs `torch.linalg.svd`.

Headline: one 512-token block for 32 layers x 8 KV heads (N = 256 matrices [512, 128]) in one
call. What a cache really does is one call per layer and role with N = batch x 8 KV heads
(keys rank 16, values rank 32); `per_block_all_layers_ms` times that, for the amortized cost.
"""
from __future__ import annotations

import time

import torch

from spectral_kv import COMPRESSORS, SpectralConfig
from spectral_kv.compressors import TritonRSVD


def low_rank_plus_noise(n, t, d, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, t, d, generator=g, device=device)).Q
    v = torch.linalg.qr(torch.randn(n, d, d, generator=g, device=device)).Q
    s = 0.93 ** torch.arange(d, device=device, dtype=torch.float32) * 10
    return (u * s) @ v.transpose(1, 2) + 0.01 * torch.randn(n, t, d, generator=g, device=device)


def timed(fn, reps):
    """Median wall ms of ``fn`` (CUDA-synchronized), after one warm-up call."""
    cuda = torch.cuda.is_available()
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def compressor(rank, device):
    cfg = SpectralConfig(compressor="triton_rsvd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False,
                         k_rank_keys=rank, k_rank_values=rank)
    return COMPRESSORS["triton_rsvd"](cfg, "keys", rank)


def headline(n, t, d, device, reps, log, ranks=(16, 32)):
    """triton_rsvd (graph) and eager vs torch.linalg.svd on N matrices; errors vs exact SVD."""
    x = low_rank_plus_noise(n, t, d, device)
    sv = torch.linalg.svdvals(x)
    svd_ms = timed(lambda: torch.linalg.svd(x, full_matrices=False), max(2, reps // 4))
    rows, ok = [], True
    for rank in ranks:
        comp = compressor(rank, device)
        c, b = comp.factorize(x, rank)
        eps = 1e-6 * float(x.norm())  # a full-rank call has optimum 0
        opt = sv[:, rank:].pow(2).sum(-1).sqrt()
        ratio = (((x - c @ b).norm(dim=(1, 2)) + eps) / (opt + eps)).max().item()
        graph_ms = timed(lambda: comp.factorize(x, rank), reps)
        TritonRSVD.use_cuda_graphs = False
        try:
            eager_ms = timed(lambda: comp.factorize(x, rank), max(2, reps // 4))
        finally:
            TritonRSVD.use_cuda_graphs = True
        prev = TritonRSVD.triton_jacobi
        TritonRSVD.triton_jacobi = not prev  # the other Jacobi, for comparison
        try:
            torch_jacobi_ms = timed(lambda: comp.factorize(x, rank), reps)
        finally:
            TritonRSVD.triton_jacobi = prev
        good = ratio <= 1.05
        ok &= good
        rows.append((rank, graph_ms, eager_ms, svd_ms, ratio))
        log(f"  rank {rank}: triton_rsvd {'graph' if x.is_cuda else 'cpu'} {graph_ms:8.3f} ms | eager "
            f"{eager_ms:8.3f} ms | graph with the other Jacobi {torch_jacobi_ms:8.3f} ms | torch.linalg.svd "
            f"{svd_ms:8.1f} ms ({svd_ms / graph_ms:6.1f}x) | err/exact max {ratio:.4f} {'OK' if good else 'FAIL (> 1.05)'}")
    return rows, ok


def jacobi_check(device, log):
    """Triton Jacobi vs torch.linalg.eigh at the rSVD's sizes (l = 24 and 40)."""
    from spectral_kv.kernels.jacobi import jacobi_eigh_triton

    ok = True
    for n in (24, 40):
        g = torch.Generator(device=device).manual_seed(n)
        a = torch.randn(64, n, n, generator=g, device=device)
        a = a @ a.transpose(1, 2) / n
        try:
            w, v = jacobi_eigh_triton(a)
            ref = torch.linalg.eigvalsh(a.double()).flip(-1)
            err = ((w.double() - ref).abs().max() / ref.abs().max()).item()
            res = ((a @ v - v * w[:, None, :]).abs().max() / ref.abs().max()).item()
            good = err < 1e-5 and res < 1e-4
        except Exception as exc:  # report and go on: the compressor can use the torch Jacobi
            err = res = float("nan")
            good = False
            log(f"  triton Jacobi n={n} raised {exc!r}"[:600])
        ok &= good
        log(f"  triton Jacobi n={n}: eigenvalue rel err {err:.1e}, residual {res:.1e} {'OK' if good else 'FAIL'}")
    return ok


def jacobi_opcheck(device, log):
    """torch.library.opcheck of spectral_kv::jacobi_eigh with all default test utils."""
    try:
        from spectral_kv.kernels.jacobi import _schedule

        a = torch.randn(2, 6, 6, device=device)
        p, q = _schedule(32, str(a.device))
        res = torch.library.opcheck(torch.ops.spectral_kv.jacobi_eigh.default, (a @ a.transpose(1, 2), p, q, 2))
        good = all(v == "SUCCESS" for v in res.values())
        log(f"  opcheck spectral_kv::jacobi_eigh (all default utils): {res}")
    except Exception as exc:
        good = False
        log(f"  opcheck spectral_kv::jacobi_eigh FAILED: {exc!r}"[:1500])
    return good


def per_block_all_layers_ms(batch, layers, kv_heads, t, d, rk, rv, device, reps):
    """Time of compressing one block per row for every layer, keys and values (graph path)."""
    x = low_rank_plus_noise(batch * kv_heads, t, d, device, seed=1)
    ck, cv = compressor(rk, device), compressor(rv, device)
    one = timed(lambda: (ck.factorize(x, rk), cv.factorize(x, rv)), reps)
    return one * layers
