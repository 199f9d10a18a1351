"""Hostile input to the tiers: random shapes, dtypes, update sizes around the block boundary,
padding, NaN/Inf and malformed updates. Never a crash with an unclear error, never a silent
store of bad data, and every real token is held exactly once, in order (lossless settings)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spectral_kv import SpectralConfig, TierManager

DTYPES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative tolerance


@st.composite
def setups(draw):
    bs = draw(st.sampled_from([4, 8]))
    d = draw(st.sampled_from([2, 4, 8]))
    cfg = SpectralConfig(
        block_size=bs,
        k_rank_keys=min(d, bs),  # full rank: lossless with unquantized coefficients
        k_rank_values=min(d, bs),
        hot_buffer_size=draw(st.integers(0, bs - 1)),
        sink_tokens=draw(st.integers(0, 3)),
        compressor="exact_svd", coeff_bits=None, value_bits="same",
        basis_dtype="float32",
        verbose=False,
    )
    # update sizes: empty, < one block, exactly one block, block + 1, several blocks at once
    size = st.sampled_from([0, 1, bs - 1, bs, bs + 1, 3 * bs + 2, 5 * bs])
    sizes = draw(st.lists(size, min_size=1, max_size=6))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), d)
    return cfg, sizes, shape, draw(st.sampled_from(list(DTYPES)))


@given(setup=setups(), pad_p=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**16))
def test_any_updates_conserve_tokens_in_order(setup, pad_p, seed):
    cfg, sizes, (b, h, d), dtype = setup
    tm = TierManager(cfg, name="layer 5")
    g = torch.Generator().manual_seed(seed)
    sent = [[] for _ in range(b)]
    for t in sizes:
        k = torch.randn(b, h, t, d, generator=g).to(dtype)
        v = torch.randn(b, h, t, d, generator=g).to(dtype)
        valid = torch.rand(b, t, generator=g) >= pad_p
        tm.append(k, v, valid)
        for i in range(b):
            sent[i].append(torch.stack((k[i][:, valid[i]], v[i][:, valid[i]])))
    assert tm.seen == sum(sizes)
    if not tm.initialized or max(tm.tokens()) == 0:
        assert tm.tokens() == [0] * b
        return
    keys, values, mask = tm.materialize()
    assert keys.dtype == values.dtype == dtype
    tol = DTYPES[dtype]
    for i in range(b):
        expect = torch.cat(sent[i], dim=2).float()
        n = expect.shape[2]
        assert tm.tokens()[i] == n
        assert mask is None or int(mask[i].sum()) == n
        got = torch.stack((keys[i, :, :n], values[i, :, :n])).float()
        assert torch.allclose(got, expect, rtol=tol, atol=tol), (i, (got - expect).abs().max())
        # bounds: warm never reaches a full block beyond the hot window
        assert tm.n_exact[i] - min(cfg.sink_tokens, tm.n_exact[i]) - cfg.hot_buffer_size < cfg.block_size


@given(
    setup=setups(),
    bad=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    role=st.sampled_from(["keys", "values"]),
    where=st.floats(0, 0.999),
    in_padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_non_finite_is_refused_before_anything_is_stored(setup, bad, role, where, in_padding, seed):
    cfg, sizes, (b, h, d), dtype = setup
    tm = TierManager(cfg, name="layer 2")
    g = torch.Generator().manual_seed(seed)
    tm.append(torch.randn(b, h, 3, d, generator=g).to(dtype), torch.randn(b, h, 3, d, generator=g).to(dtype))
    before = (tm.tokens(), tm.seen, [t.clone() for t in tm.held_tensors()])
    t = max(sizes[0], 1)
    k, v = torch.randn(b, h, t, d, generator=g).to(dtype), torch.randn(b, h, t, d, generator=g).to(dtype)
    flat = int(where * k.numel())
    row, pos = flat // (h * t * d), (flat // d) % t
    (k if role == "keys" else v).view(-1)[flat] = bad
    valid = torch.ones(b, t, dtype=torch.bool)
    if in_padding:
        valid[row, pos] = False
        tm.append(k, v, valid)  # padding is dropped, so its NaN is never stored
        assert tm.tokens() == [n + t - (i == row) for i, n in enumerate(before[0])]
        assert all(bool(torch.isfinite(x).all()) for x in tm.held_tensors())
        return
    with pytest.raises(ValueError, match=rf"layer 2: {role} of batch row\(s\) \[{row}\] hold NaN/Inf"):
        tm.append(k, v, valid)
    assert (tm.tokens(), tm.seen) == before[:2]
    assert all(torch.equal(x, y) for x, y in zip(tm.held_tensors(), before[2], strict=True))


MALFORMED = {
    "3-D keys": (lambda b, h, d: (torch.randn(b, h, d), torch.randn(b, h, d), None), "must both be"),
    "5-D keys": (lambda b, h, d: (torch.randn(b, h, 1, d, 1), torch.randn(b, h, 1, d, 1), None), "must both be"),
    "k/v shapes differ": (lambda b, h, d: (torch.randn(b, h, 2, d), torch.randn(b, h, 3, d), None), "must both be"),
    "int keys": (lambda b, h, d: (torch.ones(b, h, 1, d, dtype=torch.int32),) * 2 + (None,), "float dtype"),
    "k/v dtypes differ": (lambda b, h, d: (torch.randn(b, h, 1, d), torch.randn(b, h, 1, d).half(), None), "share one float dtype"),
    "batch changes": (lambda b, h, d: (torch.randn(b + 1, h, 1, d), torch.randn(b + 1, h, 1, d), None), "does not match"),
    "heads change": (lambda b, h, d: (torch.randn(b, h + 1, 1, d), torch.randn(b, h + 1, 1, d), None), "does not match"),
    "head_dim changes": (lambda b, h, d: (torch.randn(b, h, 1, d + 1), torch.randn(b, h, 1, d + 1), None), "does not match"),
    "dtype changes": (lambda b, h, d: (torch.randn(b, h, 1, d).bfloat16(), torch.randn(b, h, 1, d).bfloat16(), None), "the cache holds"),
    "device changes": (lambda b, h, d: (torch.randn(b, h, 1, d, device="meta"), torch.randn(b, h, 1, d, device="meta"), None), "on meta"),
    "valid not bool": (lambda b, h, d: (torch.randn(b, h, 2, d), torch.randn(b, h, 2, d), torch.ones(b, 2)), "valid must be bool"),
    "valid wrong shape": (lambda b, h, d: (torch.randn(b, h, 2, d), torch.randn(b, h, 2, d), torch.ones(b, 3, dtype=torch.bool)), "valid must be bool"),
}


@given(case=st.sampled_from(sorted(MALFORMED)), b=st.integers(1, 3), h=st.integers(1, 3), d=st.sampled_from([4, 8]))
def test_malformed_updates_raise_clear_errors_and_change_nothing(case, b, h, d):
    cfg = SpectralConfig.preset("fast", block_size=8, k_rank_keys=4, k_rank_values=4, hot_buffer_size=2, sink_tokens=1, verbose=False)
    tm = TierManager(cfg, name="layer 9")
    tm.append(torch.randn(b, h, 11, d), torch.randn(b, h, 11, d))
    before = (tm.tokens(), tm.seen, [t.clone() for t in tm.held_tensors()])
    make, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message) as info:
        tm.append(*make(b, h, d))
    assert "layer 9" in str(info.value)
    assert (tm.tokens(), tm.seen) == before[:2]
    assert all(torch.equal(x, y) for x, y in zip(tm.held_tensors(), before[2], strict=True))


def test_head_dim_smaller_than_rank_is_named():
    tm = TierManager(SpectralConfig.preset("fast", block_size=8, k_rank_keys=6, k_rank_values=2, hot_buffer_size=2, verbose=False))
    with pytest.raises(ValueError, match="k_rank_keys=6 exceeds the model's head_dim=4"):
        tm.append(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
