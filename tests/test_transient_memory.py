"""Compressing a long prompt in one update never makes a transient float32 copy of the whole
prompt: blocks go to the compressor MAX_BLOCKS_PER_CALL at a time. Measured with torch's CPU
allocator profiling (every allocation of every op), with a control run that shows the
measurement does see a whole-prompt float32 copy when the chunking is switched off."""

import torch
from torch.profiler import ProfilerActivity, profile

import spectral_kv.tiers as tiers
from spectral_kv import SpectralConfig, TierManager

CFG = SpectralConfig.preset("fast", block_size=32, k_rank_keys=4, k_rank_values=4, hot_buffer_size=4, sink_tokens=4, verbose=False)
B, H, D, BLOCKS, CHUNK = 1, 2, 16, 40, 4


def _compress_prompt(monkeypatch, per_call):
    monkeypatch.setattr(tiers, "MAX_BLOCKS_PER_CALL", per_call)
    tm = TierManager(CFG)
    inputs = []
    for comp in (tm.key_compressor, tm.value_compressor):
        original = comp.compress
        monkeypatch.setattr(comp, "compress", lambda x, original=original: (inputs.append(x.shape), original(x))[1])
    n = CFG.sink_tokens + BLOCKS * CFG.block_size + CFG.hot_buffer_size
    k = torch.randn(B, H, n, D, dtype=torch.float16)
    v = torch.randn_like(k)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tm.append(k, v)
    assert tm.n_cold == [BLOCKS]
    allocs = [(e.self_cpu_memory_usage, e.name) for e in prof.events() if e.self_cpu_memory_usage > 0]
    return allocs, inputs, k


def test_long_prompt_is_compressed_in_bounded_chunks(monkeypatch):
    allocs, inputs, k = _compress_prompt(monkeypatch, CHUNK)
    block_fp32 = H * CFG.block_size * D * 4
    prompt_fp32 = k.numel() * 4
    # the compressor never sees more than CHUNK blocks (per head) at once
    assert max(shape[0] for shape in inputs) == CHUNK * H and len(inputs) == 2 * BLOCKS // CHUNK
    # the largest allocations are the exact tier itself (fp16, as DynamicCache holds it)...
    assert max(a for a, _ in allocs) <= k.numel() * k.element_size() < prompt_fp32
    # ...and every other transient is bounded by one chunk of float32 blocks
    others = [a for a, name in allocs if name != "aten::cat"]
    assert max(others) <= CHUNK * block_fp32, sorted(allocs)[-5:]


def test_measurement_sees_a_whole_prompt_copy_when_unchunked(monkeypatch):
    allocs, inputs, k = _compress_prompt(monkeypatch, 10**6)
    assert max(shape[0] for shape in inputs) == BLOCKS * H
    # float32 copy of all 40 blocks: the bound above would have failed
    assert max(a for a, name in allocs if name != "aten::cat") >= BLOCKS * H * CFG.block_size * D * 4
