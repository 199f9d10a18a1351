"""Random inputs of the decode kernels, shared by their tests and their GPU benchmarks.

One builder per kernel, so a test on the CPU interpreter and a timing on the GPU read the same
kind of data: codes over their full range, scales decaying over the components (as a real
block's singular values do), and, with ``poison``, NaN / inf in every pool slot and exact-tail
position past the valid counts, which a correct kernel never reads.
"""

from __future__ import annotations

import torch

__all__ = ["svd_decode_inputs"]


def svd_decode_inputs(B, H, G, D, T, NB, Te, rk=4, rv=8, dtype=torch.float32, seed=0, n_cold=None, n_exact=None,
                      device="cpu", poison=True, decay=False):
    """Inputs of `spectral_kv.kernels.fused_decode` (the SVD layout) as a dict of its arguments.

    Parameters
    ----------
    B, H, G, D : batch rows, KV heads, query heads per KV head, head_dim
    T, NB, Te : tokens per block, cold blocks per row (pool width), exact-tail width
    rk, rv : key / value rank
    n_cold, n_exact : list of int, optional
        Valid blocks / exact tokens per row; default ragged (``NB - b % 2``, ``Te - 3 b``).
    decay : bool
        Scales decaying over the components like singular values (the benchmarks' data); else
        uniform ones.
    """
    # drawn on ``device`` (a GPU benchmark's pools are hundreds of MB)
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    q = r(B, H * G, D).to(dtype)
    kc = torch.randint(-127, 128, (B, H, NB, T, rk), generator=g, dtype=torch.int8, device=device)
    vc = torch.randint(-127, 128, (B, H, NB, T, rv), generator=g, dtype=torch.int8, device=device)
    if decay:
        ks = (r(B, H, NB, rk).abs() * 0.5 + 0.5) * 0.85 ** torch.arange(rk, device=device) * (3.0 / 127)
        vs = (r(B, H, NB, rv).abs() * 0.5 + 0.5) * 0.9 ** torch.arange(rv, device=device) * (1.0 / 127)
        kb = (r(B, H, NB, rk, D) / D**0.5 * 4).half()
        vb = (r(B, H, NB, rv, D) / D**0.5 * 4).half()
    else:
        ks = (r(B, H, NB, rk).abs() + 0.1) / 127.0
        vs = (r(B, H, NB, rv).abs() + 0.1) / 127.0
        kb = (r(B, H, NB, rk, D) / D**0.5).half()
        vb = (r(B, H, NB, rv, D) / rv**0.5).half()
    ek, ev = r(B, H, Te, D).to(dtype), r(B, H, Te, D).to(dtype)
    if n_cold is None:
        n_cold = [NB - (b % 2) if NB else 0 for b in range(B)]
    if n_exact is None:
        n_exact = [max(1, Te - 3 * b) for b in range(B)] if Te else [0] * B
    if poison:
        for b in range(B):
            ks[b, :, n_cold[b]:] = float("nan")
            vs[b, :, n_cold[b]:] = float("nan")
            kb[b, :, n_cold[b]:] = float("nan")
            vb[b, :, n_cold[b]:] = float("inf")
            ek[b, :, n_exact[b]:] = float("nan")
            ev[b, :, n_exact[b]:] = float("nan")
    return dict(q=q, k_coeffs=kc, k_scales=ks, k_basis=kb, v_coeffs=vc, v_scales=vs, v_basis=vb,
                n_cold=torch.tensor(n_cold, dtype=torch.int32, device=device), exact_k=ek, exact_v=ev,
                n_exact=torch.tensor(n_exact, dtype=torch.int32, device=device), scaling=D**-0.5)
