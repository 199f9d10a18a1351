"""CPU timing of one `spectral` decode step on the default `hadamard` layout (and SVD for scale).

    PYTHONPATH=. python benchmarks/bench_shared_basis.py

B=4 sequences, H=3 KV heads x G=3 query heads each, D=64, 32 cold blocks of 128 tokens, 16 exact
tokens, Tq=1. Prints the median of repeated ``attend`` calls per layout: the whole step, and
the step with the coefficients dequantized beforehand (what is left is the attention math
proper, where the basis is applied; on CPU the bit unpacking dominates the whole step).
"""

import time

import torch

from spectral_kv import ATTENTION_STRATEGIES, SpectralConfig
from spectral_kv.compressors import COMPRESSORS
from spectral_kv.view import AttendView

B, H, G, D, NB, T, TE = 4, 3, 3, 64, 32, 128, 16
LAYOUTS = {
    "hadamard": SpectralConfig(block_size=T, hot_buffer_size=4, verbose=False),
    "hadamard k / exact_svd v": SpectralConfig(block_size=T, hot_buffer_size=4, value_compressor="exact_svd", value_bits=8, verbose=False),
    "exact_svd": SpectralConfig.preset("fast", block_size=T, hot_buffer_size=4, compressor="exact_svd", verbose=False),
}


def cold(cfg, role, x):
    comp = COMPRESSORS[cfg.compressor_name(role)](cfg, role, cfg.rank(role))
    parts = comp.compress(x.reshape(B * H * NB, T, D))
    return comp, {k: v.reshape(B, H, NB, *v.shape[1:]) for k, v in parts.items()}


def main(reps=30):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, B, H, NB, T, D, generator=g)
    q = torch.randn(B, H * G, 1, D, generator=g)
    ek, ev = torch.randn(2, B, H, TE, D, generator=g)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} H={H} G={G} D={D} NB={NB} T={T} Tq=1")
    for name, cfg in LAYOUTS.items():
        kc, ck = cold(cfg, "keys", k)
        vc, cv = cold(cfg, "values", v)
        strat = ATTENTION_STRATEGIES["spectral"](cfg, kc, vc)
        args = (q, AttendView(ek, ev, ck, cv), D**-0.5)
        full = median_ms(strat.attend, args, reps)
        for comp, parts in ((kc, ck), (vc, cv)):  # instance attribute: dequantize once, up front
            comp.coefficients = lambda _, c=comp.coefficients(parts): c
        math = median_ms(strat.attend, args, reps)
        print(f"{name:26s} step {full:7.2f} ms   without dequantization {math:6.2f} ms")


def median_ms(fn, args, reps):
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


if __name__ == "__main__":
    main()
