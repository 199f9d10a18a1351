import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_kv import SpectralConfig, TierManager


def _lossless(**kw):
    base = dict(block_size=8, k_rank_keys=6, k_rank_values=6, hot_buffer_size=3, sink_tokens=2, compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32")
    base.update(kw)
    return SpectralConfig(**base)


chunks = st.lists(st.integers(0, 30), min_size=1, max_size=8)


@given(sizes=chunks, batch=st.integers(1, 3), sinks=st.integers(0, 3), hot=st.integers(0, 7), seed=st.integers(0, 10**6), pad_p=st.floats(0, 0.5))
def test_tokens_conserved_in_order(sizes, batch, sinks, hot, seed, pad_p):
    """Any sequence of appends (any sizes, with padding dropped per row): every real token is
    held exactly once, in order; tiers respect their bounds."""
    cfg = _lossless(sink_tokens=sinks, hot_buffer_size=hot)
    tm = TierManager(cfg)
    g = torch.Generator().manual_seed(seed)
    sent = [[] for _ in range(batch)]
    for t in sizes:
        k = torch.randn(batch, 2, t, 6, generator=g)
        v = torch.randn(batch, 2, t, 6, generator=g)
        valid = torch.rand(batch, t, generator=g) >= pad_p
        tm.append(k, v, valid)
        for b in range(batch):
            sent[b].append(torch.stack((k[b][:, valid[b]], v[b][:, valid[b]])))
    keys, values, mask = tm.materialize()
    assert tm.seen == sum(sizes)
    for b in range(batch):
        expect = torch.cat(sent[b], dim=2)
        n = expect.shape[2]
        assert tm.tokens()[b] == n
        assert mask is None or int(mask[b].sum()) == n
        assert torch.allclose(keys[b, :, :n], expect[0], atol=1e-5)
        assert torch.allclose(values[b, :, :n], expect[1], atol=1e-5)
        # warm never reaches a full block beyond the hot window
        assert tm.n_exact[b] - min(sinks, tm.n_exact[b]) - hot < cfg.block_size


@given(sizes=chunks, batch=st.integers(1, 3), bits=st.sampled_from([None, 8, 4]), pad_p=st.floats(0, 0.4), seed=st.integers(0, 1000))
def test_reported_bytes_equal_bytes_held(sizes, batch, bits, pad_p, seed):
    cfg = SpectralConfig(block_size=8, hot_buffer_size=2, sink_tokens=1, coeff_bits=bits)
    tm = TierManager(cfg)
    g = torch.Generator().manual_seed(seed)
    for t in sizes:
        tm.append(torch.randn(batch, 3, t, 8, generator=g), torch.randn(batch, 3, t, 8, generator=g), torch.rand(batch, t, generator=g) >= pad_p)
    held = sum(t.numel() * t.element_size() for t in tm.held_tensors())
    assert tm.memory_report()["total_bytes"] == held


def test_long_prompt_compressed_at_prefill():
    cfg = SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=4)
    tm = TierManager(cfg)
    tm.append(torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8))
    # 100 = 4 sinks + 5 blocks of 16 + 16 exact (>= 4 hot, < 16 + 4)
    assert tm.n_cold == [5] and tm.n_exact == [20]


def test_nan_never_enters_a_cold_block():
    cfg = SpectralConfig.preset("fast", block_size=8, k_rank_keys=2, k_rank_values=2, hot_buffer_size=2, sink_tokens=0, verbose=False)
    tm = TierManager(cfg, name="layer 7")
    k = torch.randn(2, 1, 12, 4)
    k[1, 0, 3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 7: keys of batch row\(s\) \[1\] hold NaN/Inf"):
        tm.append(k, torch.randn(2, 1, 12, 4))
    tm2 = TierManager(cfg)
    v = torch.randn(1, 1, 12, 4)
    v[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="values"):
        tm2.append(torch.randn(1, 1, 12, 4), v)


def test_mismatched_updates_rejected():
    tm = TierManager(_lossless())
    tm.append(torch.randn(2, 2, 3, 6), torch.randn(2, 2, 3, 6))
    with pytest.raises(ValueError, match="does not match"):
        tm.append(torch.randn(3, 2, 1, 6), torch.randn(3, 2, 1, 6))
    with pytest.raises(ValueError, match="float64"):
        tm.append(torch.randn(2, 2, 1, 6, dtype=torch.float64), torch.randn(2, 2, 1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="must both be"):
        tm.append(torch.randn(2, 2, 1, 6), torch.randn(2, 2, 2, 6))


def test_select_rows_reorders_everything():
    tm = TierManager(_lossless())
    k, v = torch.randn(3, 2, 30, 6), torch.randn(3, 2, 30, 6)
    tm.append(k, v)
    tm.select_rows(torch.tensor([2, 0, 0]))
    keys, _, _ = tm.materialize()
    assert torch.allclose(keys, k[[2, 0, 0]], atol=1e-5)
