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


@given(sizes=chunks, batch=st.integers(1, 3), bits=st.sampled_from([None, 8, 4]), pad_p=st.floats(0, 0.4), seed=st.integers(0, 1000),
       stats=st.sampled_from(["fp16", "byte"]))
def test_reported_bytes_equal_bytes_held(sizes, batch, bits, pad_p, seed, stats):
    # value_stats: float16 or uint8/int8 value statistics (3-bit values: they are quantized either way)
    cfg = SpectralConfig(block_size=8, hot_buffer_size=2, sink_tokens=1, coeff_bits=bits, value_stats=stats)
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


def test_freeze_right_after_a_deferred_prompt_compresses_it_first():
    """A press-deferred prompt (`defer_next_compression`) holds more exact tokens than a frozen
    layer's static width: `freeze` settles it first, to the same tiers as an undeferred one."""
    cfg = _lossless()
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, 40, 6, generator=g), torch.randn(2, 2, 40, 6, generator=g)
    tm, ref = TierManager(cfg), TierManager(cfg)
    tm.defer_next_compression = True
    tm.append(k, v)
    ref.append(k, v)
    assert tm.n_cold == [0, 0] and ref.n_cold == [4, 4]  # (40 - 2 sinks - 3 hot) // 8
    tm.freeze(9)
    ref.freeze(9)
    assert tm.static and tm.n_cold == ref.n_cold and tm.n_exact == ref.n_exact
    for _ in range(9):  # static decode steps, blocks going cold on the way
        nk, nv = torch.randn(2, 2, 1, 6, generator=g), torch.randn(2, 2, 1, 6, generator=g)
        for t in (tm, ref):
            assert t.view(nk, nv).static
            t.commit()
    assert tm.n_cold == ref.n_cold == [5, 5]
    for a, b in zip(tm.materialize()[:2], ref.materialize()[:2]):
        assert torch.equal(a, b)


def _stateful(**kw):
    import plugins  # noqa: F401  (registers test_pca: per-row shared mean and basis, fitted once per row)

    base = dict(compressor="test_pca", attention="reconstruct", block_size=8, k_rank_keys=8, k_rank_values=8,
                hot_buffer_size=3, sink_tokens=2, coeff_bits=None, value_bits="same", basis_dtype="float32",
                verbose=False)
    return SpectralConfig(**{**base, **kw})


def _shared(tm):
    return {f"{role}.{n}": t.clone() for role, d in (("k", tm.cold.shared_k), ("v", tm.cold.shared_v)) for n, t in d.items()}


def test_truncate_into_cold_blocks_keeps_the_rows_shared_state():
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 2, 39, 8, generator=g), torch.randn(2, 2, 39, 8, generator=g)
    tm = TierManager(_stateful())
    tm.append(k, v)
    assert tm.n_cold == [4, 4] and tm.cold.fitted == [True, True]
    fitted = _shared(tm)
    assert sorted(fitted) == ["k.basis", "k.mean", "v.basis", "v.mean"]
    dk, dv = tm.dense()
    n = 2 + 2 * 8 + 3  # inside block 2: blocks 0 and 1 survive, 3 tokens of block 2 held exactly
    tm.truncate(n, dk[:, :, :n], dv[:, :, :n])
    assert tm.n_cold == [2, 2] and tm.seen == n and tm.tokens() == [n, n] and tm.n_exact == [5, 5]
    for got, want in zip(tm.dense(), (dk, dv)):
        assert torch.equal(got, want[:, :, :n])  # attention reads what it read before the cut
    assert tm.cold.fitted == [True, True]
    assert all(torch.equal(t, fitted[name]) for name, t in _shared(tm).items()) and _shared(tm).keys() == fitted.keys()
    # the cut block fills again and is compressed with the rows' state (not fitted anew)
    nk, nv = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    tm.append(nk, nv)
    assert tm.n_cold == [3, 3]
    assert all(torch.equal(t, fitted[name]) for name, t in _shared(tm).items())
    keys, values, _ = tm.materialize()
    assert torch.allclose(keys, torch.cat((dk[:, :, :n], nk), 2), atol=1e-5)
    assert torch.allclose(values, torch.cat((dv[:, :, :n], nv), 2), atol=1e-5)


def test_truncate_before_the_first_block_drops_the_shared_state_and_refits():
    g = torch.Generator().manual_seed(6)
    cfg = _stateful()
    tm = TierManager(cfg)
    tm.append(torch.randn(2, 2, 39, 8, generator=g), torch.randn(2, 2, 39, 8, generator=g))
    dk, dv = tm.dense()
    tm.truncate(6, dk[:, :, :6], dv[:, :, :6])  # < sinks + one block: no block survives
    assert tm.n_cold == [0, 0] and tm.cold.shared_k == {} and tm.cold.fitted == [False, False]
    assert torch.equal(tm.dense()[0], dk[:, :, :6])
    nk, nv = torch.randn(2, 2, 20, 8, generator=g), torch.randn(2, 2, 20, 8, generator=g)
    tm.append(nk, nv)
    fresh = TierManager(cfg)
    fresh.append(torch.cat((dk[:, :, :6], nk), 2), torch.cat((dv[:, :, :6], nv), 2))
    assert tm.n_cold == fresh.n_cold == [2, 2] and tm.cold.fitted == [True, True]
    ours, theirs = _shared(tm), _shared(fresh)
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in ours)


def test_replace_fits_the_new_contents_at_their_first_compression():
    g = torch.Generator().manual_seed(7)
    cfg = _stateful()
    tm = TierManager(cfg)
    tm.defer_next_compression = True  # as under a kvpress press: the prompt stays exact
    tm.append(torch.randn(2, 2, 39, 8, generator=g), torch.randn(2, 2, 39, 8, generator=g))
    assert tm.n_cold == [0, 0] and tm.cold.fitted in ([], [False, False])
    k2, v2 = torch.randn(2, 2, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g)
    tm.replace(k2, v2)
    assert tm.n_cold == [0, 0] and tm.seen == 30  # left exact for a second writer
    tm.settle()
    fresh = TierManager(cfg)
    fresh.append(k2, v2)
    assert tm.n_cold == fresh.n_cold == [3, 3] and tm.cold.fitted == [True, True]
    ours, theirs = _shared(tm), _shared(fresh)
    assert ours.keys() == theirs.keys() and all(torch.allclose(ours[n], theirs[n], atol=1e-6) for n in ours)
    with pytest.raises(NotImplementedError, match=r"needs an uncompressed layer, but rows hold \[3, 3\] compressed"):
        tm.replace(k2, v2)


def test_truncate_refuses_bad_arguments_by_name():
    tm = TierManager(_lossless(), name="layer 2")
    k, v = torch.randn(1, 2, 30, 6), torch.randn(1, 2, 30, 6)
    tm.append(k, v)
    with pytest.raises(ValueError, match=r"layer 2: truncate\(n\) needs an int in \[0, 30\], got 31"):
        tm.truncate(31, k, v)
    with pytest.raises(ValueError, match=r"truncate\(12\) got values shaped \(1, 2, 5, 6\), expected \[1, 2, >= 12, 6\]"):
        tm.truncate(12, k, v[:, :, :5])
    assert tm.seen == 30 and tm.n_cold == [3]  # nothing changed


def test_decode_commit_reuses_the_views_concatenation_and_equals_append():
    """An unpadded decode step: commit keeps the exact buffer the view built for attention (no
    second concatenation), and the tiers end up as `append` of the same tokens leaves them."""
    cfg = _lossless()
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 2, 13, 6, generator=g), torch.randn(2, 2, 13, 6, generator=g)
    viewed, appended = TierManager(cfg), TierManager(cfg)
    for tm in (viewed, appended):
        tm.append(k0, v0)  # one block cold already
    reused = 0
    for _ in range(9):  # crosses a block boundary (block_size 8)
        k, v = torch.randn(2, 2, 1, 6, generator=g), torch.randn(2, 2, 1, 6, generator=g)
        mask = torch.ones(2, 1, 1, viewed.seen + 1, dtype=torch.bool)
        view = viewed.view(k, v, mask)
        width_before = viewed.exact_k.shape[2]
        viewed.commit()
        if viewed.exact_k.shape[2] == width_before + 1:  # no block went cold in this step
            assert viewed.exact_k is view.exact_k and viewed.exact_v is view.exact_v
            reused += 1
        appended.append(k, v)
        assert viewed.n_exact == appended.n_exact and viewed.n_cold == appended.n_cold
        assert torch.equal(viewed.exact_k, appended.exact_k) and torch.equal(viewed.exact_v, appended.exact_v)
    assert viewed.n_cold == [2, 2] and reused == 8


def test_padding_decode_token_is_dropped_even_after_the_mask_was_checked_before():
    """The per-step memo of the mask's last row (`view.new_tokens_real`) follows the mask's
    identity and in-place changes: a row whose new token is padding never stores it."""
    from spectral_kv.view import new_tokens_real

    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    assert new_tokens_real(mask, 1)
    mask[1, 0, 0, -1] = False  # in place: the memo must not answer from before
    assert not new_tokens_real(mask, 1)
    assert new_tokens_real(torch.ones(2, 1, 1, 5, dtype=torch.bool), 1)
    with torch.inference_mode():  # inference tensors have no version counter: answered without the memo
        imask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
        assert new_tokens_real(imask, 1)
        imask[0, 0, 0, -1] = False
        assert not new_tokens_real(imask, 1)
    tm = TierManager(_lossless())
    tm.append(torch.randn(2, 2, 4, 6), torch.randn(2, 2, 4, 6))
    tm.view(torch.randn(2, 2, 1, 6), torch.randn(2, 2, 1, 6), mask)
    tm.commit()
    assert tm.n_exact == [5, 4] and tm.seen == 5


def test_deferred_finite_check_reports_a_bad_decode_update_before_any_block_is_compressed(monkeypatch):
    """On CUDA a decode update's NaN/Inf check is read lazily (no host sync per layer per step,
    `checks.DeferredFinite`); here the CPU is put on that path. A bad update is reported by
    position within FINITE_CHECK_EVERY updates, or at once when a block is about to compress."""
    from spectral_kv import checks

    monkeypatch.setattr(checks, "DEFER_FINITE_ON", frozenset({"cpu"}))
    cfg = SpectralConfig.preset("balanced", block_size=16, hot_buffer_size=4, verbose=False)
    g = torch.Generator().manual_seed(0)
    tm = TierManager(cfg, name="layer 3")
    tm.append(torch.randn(1, 2, 5, 64, generator=g), torch.randn(1, 2, 5, 64, generator=g))  # prefill: checked at once
    tm.append(torch.randn(1, 2, 1, 64, generator=g), torch.randn(1, 2, 1, 64, generator=g))
    bad = torch.randn(1, 2, 1, 64, generator=g)
    bad[0, 1, 0, 7] = float("nan")
    tm.append(bad, torch.randn(1, 2, 1, 64, generator=g))  # position 6: not read yet
    assert tm.n_exact == [7]
    with pytest.raises(ValueError, match=r"layer 3: keys/values of a decode update at positions 5\.\.[0-9]+ hold NaN/Inf"):
        for _ in range(checks.FINITE_CHECK_EVERY):
            tm.append(torch.randn(1, 2, 1, 64, generator=g), torch.randn(1, 2, 1, 64, generator=g))
    assert tm.n_cold == [0]  # 4 sinks + 4 hot + 16: no block had compressed before the report
    # before a compression: the flag is read even when fewer than FINITE_CHECK_EVERY updates passed
    tm2 = TierManager(cfg)
    tm2.append(torch.randn(1, 2, 22, 64, generator=g), torch.randn(1, 2, 22, 64, generator=g))
    inf = torch.randn(1, 2, 1, 64, generator=g)
    inf[0, 0, 0, 0] = float("inf")
    tm2.append(torch.randn(1, 2, 1, 64, generator=g), inf)  # 23 tokens: the next one fills a block
    with pytest.raises(ValueError, match="positions 22..23 hold NaN/Inf"):
        tm2.append(torch.randn(1, 2, 1, 64, generator=g), torch.randn(1, 2, 1, 64, generator=g))
    assert tm2.n_cold == [0]
    # finite updates on the deferred path hold exactly what the immediate path holds
    monkeypatch.setattr(checks, "DEFER_FINITE_ON", frozenset())
    a, b = TierManager(cfg), TierManager(cfg)
    xs = [(torch.randn(1, 2, n, 64, generator=g), torch.randn(1, 2, n, 64, generator=g)) for n in [9] + [1] * 40]
    for k, v in xs:
        a.append(k, v)
    monkeypatch.setattr(checks, "DEFER_FINITE_ON", frozenset({"cpu"}))
    for k, v in xs:
        b.append(k, v)
    assert a.n_cold == b.n_cold == [2] and torch.equal(a.exact_k, b.exact_k)
    assert all(torch.equal(a.cold.k.parts[n], b.cold.k.parts[n]) for n in a.cold.k.parts)
