"""CPU pytest-benchmark entries: decode attention strategies vs SDPA, and the compressors.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_strategies.py --benchmark-only

Decode: one layer, one query token, batch 1, 8 query / 2 KV heads, head_dim 64, 2048 cold
tokens (16 blocks of 128, ranks 16/32, int8) + 36 exact tokens, float32 (CPU). SDPA runs on the
dense K/V of the same length. `fused` runs its torch fallback here (the Triton kernel needs a
GPU; under TRITON_INTERPRET=1 it would time the interpreter). Compressors: 16 blocks of
512 x 64 (one block of one layer at batch 2 x 8 KV heads). On CPU `triton_rsvd` runs its
LAPACK reference twin (no graphs to capture); its GPU timing is benchmarks/gpu_decode_bench.py's.
"""
import os

os.environ.pop("TRITON_INTERPRET", None)  # time the CPU fallbacks, not the interpreter

import pytest
import torch
import torch.nn.functional as F

from spectral_kv import ATTENTION_STRATEGIES, COMPRESSORS, SpectralConfig, TierManager

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
B, HQ, H, D = 1, 8, 2, 64
CFG = SpectralConfig.preset("fast", block_size=128, k_rank_keys=16, k_rank_values=32, hot_buffer_size=32, sink_tokens=4)
CTX = 16 * 128 + 36


@pytest.fixture(scope="module")
def decode_inputs():
    g = torch.Generator().manual_seed(0)
    tm = TierManager(CFG)
    # Low-rank-ish keys/values so the compressed blocks look like real ones.
    base_k, base_v = torch.randn(B, H, 24, D, generator=g), torch.randn(B, H, 48, D, generator=g)
    k = torch.randn(B, H, CTX, 24, generator=g) @ base_k + 0.05 * torch.randn(B, H, CTX, D, generator=g)
    v = torch.randn(B, H, CTX, 48, generator=g) @ base_v + 0.05 * torch.randn(B, H, CTX, D, generator=g)
    tm.append(k, v)
    view = tm.view()
    q = torch.randn(B, HQ, 1, D, generator=g)
    args = (q, view, D**-0.5)
    dense = tm.materialize()
    return tm, args, dense


@pytest.mark.parametrize("name", ["sdpa", "reconstruct", "spectral", "fused"])
def test_decode(record, decode_inputs, name):
    tm, args, (keys, values, _) = decode_inputs
    assert tm.n_cold == [16] and keys.shape[2] == CTX
    q = args[0]
    if name == "sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, keys, values, scale=D**-0.5, enable_gqa=True)  # noqa: E731
    else:
        strategy = ATTENTION_STRATEGIES[name](CFG, tm.key_compressor, tm.value_compressor)
        fn = lambda: strategy.attend(*args)  # noqa: E731
    out = record("decode 1x2K, 8q/2kv heads, D=64", name, fn)
    ref = F.scaled_dot_product_attention(q, keys, values, scale=D**-0.5, enable_gqa=True)
    # Same function (the cold blocks decompressed are what SDPA reads).
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("name", ["exact_svd", "randomized_svd", "triton_rsvd"])
def test_compress(record, name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 512, 24, generator=g) @ torch.randn(16, 24, 64, generator=g)
    x = x + 0.05 * torch.randn(16, 512, 64, generator=g)
    comp = COMPRESSORS[name](CFG, "keys", 16)
    parts = record("compress 16 blocks 512x64, rank 16", name, comp.compress, x)
    err = (comp.decompress(parts, torch.float32) - x).norm() / x.norm()
    opt = torch.linalg.svdvals(x)[:, 16:].pow(2).sum().sqrt() / x.norm()
    assert err <= 1.05 * opt + 0.01  # int8 coefficients add ~0.4% (documented tolerance)
