"""Static (frozen) storage: decode steps on preallocated buffers with device-side counters, the
layout a CUDA graph replays (spectral_kv/static.py, spectral_kv/graphs.py). On the CPU we check
what capture needs and what it must not change: the same tokens and tiers as the dynamic cache,
no host sync or host-to-device tensor inside a step, fixed addresses between steps, and blocks
compressed in the background (compress_lag) landing exactly where synchronous ones do."""

import pytest
import torch
from test_integration import LOSSLESS, LOSSY, greedy, tiny
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv import SpectralConfig, StaticDecoder, TierManager
from spectral_kv.graphs import deferred_advance

CFG = SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, quant_group=16, verbose=False)


def _same_tokens(a, b):
    """Both tier managers hold the same tokens per row, in order, bit for bit (the width of
    `materialize` and what lies in masked-out positions do not matter)."""
    assert a.tokens() == b.tokens()
    if not a.initialized or not max(a.tokens()):
        return
    (ka, va, _), (kb, vb, _) = a.materialize(), b.materialize()
    for i, n in enumerate(a.tokens()):
        assert torch.equal(ka[i, :, :n], kb[i, :, :n]) and torch.equal(va[i, :, :n], vb[i, :, :n])


def _decode_both(cfg, new_tokens, capacity, valid=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    dyn, st = TierManager(cfg), TierManager(cfg)
    k, v = torch.randn(3, 2, 37, 8, generator=g), torch.randn(3, 2, 37, 8, generator=g)
    dyn.append(k, v, valid)
    st.append(k, v, valid)
    st.freeze(capacity)
    for _ in range(new_tokens):
        nk, nv = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
        dyn.append(nk, nv)
        st.append_static(nk, nv)
        st.advance()
        assert st.n_exact_t.tolist() == st.n_exact and st.n_cold_t.tolist() == st.n_cold
    return dyn, st


@pytest.mark.parametrize("lag", [0, 5])
def test_static_decode_holds_what_the_dynamic_cache_holds(lag):
    valid = torch.ones(3, 37, dtype=torch.bool)
    valid[1, :9] = False  # left padding: rows fill their blocks at different steps
    valid[2, :20] = False
    dyn, st = _decode_both(CFG.replace(compress_lag=lag), new_tokens=70, capacity=70, valid=valid)
    st.drain()
    assert st.n_cold == dyn.n_cold and st.n_exact == dyn.n_exact and st.seen == dyn.seen
    assert min(st.n_cold) >= 3 and len(set(st.n_cold)) > 1
    _same_tokens(dyn, st)  # same blocks compressed from the same tokens: bit for bit


def test_compress_lag_serves_the_block_exactly_until_it_is_swapped_in():
    cfg = CFG.replace(compress_lag=5)
    st = TierManager(cfg)
    st.append(torch.randn(1, 2, 2 + 4 + 15, 8), torch.randn(1, 2, 2 + 4 + 15, 8))
    st.freeze(40)
    width = st.exact_k.shape[2]
    assert width == 2 + 4 + 16 + 5
    st.append_static(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    st.advance()  # fills the block: launched, not yet swapped in
    assert st.n_cold == [0] and st.n_exact == [22] and len(st.pending) == 1
    for step in range(5):
        st.append_static(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
        st.advance()
        assert st.n_cold == ([1] if step == 4 else [0])
    assert st.n_exact == [22 + 5 - 16] and not st.pending
    assert st.exact_k.shape[2] == width  # never outgrew its static width


def test_pools_grow_outside_a_step_and_say_so():
    dyn, st = _decode_both(CFG, new_tokens=0, capacity=0)
    version, capacity = st.version, st.cold_k.n_blocks
    ptrs = [t.data_ptr() for t in st.held_tensors()]
    g = torch.Generator().manual_seed(1)
    for _ in range(60):  # more blocks than reserved
        nk, nv = torch.randn(3, 2, 1, 8, generator=g), torch.randn(3, 2, 1, 8, generator=g)
        dyn.append(nk, nv)
        st.append_static(nk, nv)
        if st.cold_k.n_blocks == capacity:
            assert [t.data_ptr() for t in st.held_tensors()] == ptrs  # fixed addresses until growth
        st.advance()
    assert st.cold_k.n_blocks > capacity and st.version > version
    _same_tokens(dyn, st)


def test_any_other_operation_thaws_first():
    dyn, st = _decode_both(CFG.replace(compress_lag=3), new_tokens=20, capacity=40)
    version = st.version
    st.select_rows(torch.tensor([2, 0]))
    dyn.select_rows(torch.tensor([2, 0]))
    assert not st.static and st.version > version and not st.pending
    assert st.exact_k.shape[2] == max(st.n_exact) and st.cold_k.n_blocks == max(st.n_cold)
    _same_tokens(dyn, st)
    with pytest.raises(ValueError, match="non-negative int, got -1"):
        st.freeze(-1)
    with pytest.raises(RuntimeError, match="needs a prefilled cache"):
        TierManager(CFG).freeze(8)


# ---------------------------------------------------------------- through a model
@pytest.fixture(scope="module")
def model():
    m = tiny("llama")
    m.set_attn_implementation("spectral_kv")
    return m


def _left_padded(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 96, (2, 41), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    return ids, mask


@pytest.mark.parametrize("lag", [0, 4])
def test_static_decoder_equals_dynamic_cache_at_lossless_settings(model, lag):
    ids, mask = _left_padded()
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, past_key_values=DynamicCache())
    cache = sk.SpectralCache(LOSSLESS.replace(compress_lag=lag), model.config)
    got = StaticDecoder(model, cache).generate(ids, mask, max_new_tokens=30)
    assert torch.equal(got, expected)
    assert all(layer.tiers.static and min(layer.tiers.n_cold) >= 3 for layer in cache.spectral_layers)


@pytest.mark.parametrize("attention", ["spectral", "reconstruct"])
def test_static_decoder_equals_the_dynamic_spectral_cache_when_lossy(model, attention):
    ids, mask = _left_padded(seed=4)
    cfg = LOSSY.replace(attention=attention)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                                  past_key_values=sk.SpectralCache(cfg, model.config))
    got = StaticDecoder(model, sk.SpectralCache(cfg, model.config)).generate(ids, mask, max_new_tokens=30)
    assert torch.equal(got, expected)


def test_generate_from_cache_continues_a_filled_cache_like_generate(model, tmp_path):
    """A cache filled by one run and saved, then decoded from by another decoder, gives the
    tokens that one uninterrupted `generate` gives."""
    ids = torch.randint(1, 96, (2, 50), generator=torch.Generator().manual_seed(6))
    expected = StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, max_new_tokens=25)
    cache = sk.SpectralCache(LOSSY, model.config)
    with torch.no_grad():
        first = model(ids, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
    cache.save(tmp_path / "c.safetensors")
    restored = sk.SpectralCache.load(tmp_path / "c.safetensors", model)
    got = StaticDecoder(model, restored).generate_from_cache(first, max_new_tokens=24)
    assert torch.equal(first, expected[:, 50:51])
    assert torch.equal(got, expected[:, 51:])
    with pytest.raises(ValueError, match="needs a cache holding the context"):
        StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate_from_cache(first)


def test_generate_with_a_frozen_cache_continues_like_a_dynamic_one(model):
    # Without the driver: transformers' own generate loop on a cache frozen after the prompt.
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    dynamic = sk.SpectralCache(LOSSY, model.config)
    frozen = sk.SpectralCache(LOSSY, model.config)
    first = greedy(model, ids, n=1, past_key_values=dynamic)
    assert torch.equal(greedy(model, ids, n=1, past_key_values=frozen), first)
    frozen.freeze(40)
    expected = greedy(model, first, n=35, past_key_values=dynamic)
    assert torch.equal(greedy(model, first, n=35, past_key_values=frozen), expected)
    assert all(layer.tiers.static for layer in frozen.spectral_layers)


class _HostTraffic(TorchDispatchMode):
    """Records ops that would sync the host or copy host data to the device on a GPU."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "lift_fresh", "masked_select", "unique", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(f in name for f in self.FORBIDDEN):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["spectral", "reconstruct"])
def test_a_deferred_decode_step_is_capturable(model, attention):
    """What CUDA-graph capture needs from one step of the whole model: no host sync, no tensor
    made from host data, and every cache tensor at the same address with the same shape."""
    ids, mask = _left_padded(seed=6)
    cache = sk.SpectralCache(LOSSY.replace(attention=attention), model.config)
    dec = StaticDecoder(model, cache)
    dec.generate(ids, mask, max_new_tokens=20)  # prefill, freeze and decode (past 2 blocks)
    held = lambda: [(t.data_ptr(), t.shape) for layer in cache.spectral_layers for t in layer.tiers.held_tensors()]  # noqa: E731
    before = held()
    with deferred_advance(), _HostTraffic() as mode, torch.no_grad():
        dec._step()
    assert mode.seen == [], f"host traffic inside a decode step: {mode.seen}"
    assert held() == before
    cache.advance()  # a deferred step's host side, as the graph driver runs it after a replay
    # The control: an eager (not deferred) static step does sync (finite checks), and the mode sees it.
    with _HostTraffic() as mode, torch.no_grad():
        dec._step()
    assert "_local_scalar_dense" in " ".join(mode.seen)


def test_freeze_refuses_layers_it_cannot_serve(model):
    mistral = tiny("mistral", sliding_window=8)
    mistral.set_attn_implementation("spectral_kv")
    cache = sk.SpectralCache(LOSSY, mistral.config)
    greedy(mistral, torch.randint(1, 96, (1, 20)), n=1, past_key_values=cache)
    with pytest.raises(ValueError, match=r"layers \[0, 1\] are kept exact"):
        cache.freeze(8)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=0)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        StaticDecoder(model, sk.SpectralCache(LOSSY, model.config), use_cuda_graph=True)


def test_a_frozen_cache_saves_and_reloads_in_the_dynamic_layout(model, tmp_path):
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(8))
    cache = sk.SpectralCache(LOSSY.replace(compress_lag=3), model.config)
    dec = StaticDecoder(model, cache)
    out = dec.generate(ids, max_new_tokens=12)
    cache.save(tmp_path / "c.safetensors")
    loaded = sk.SpectralCache.load(tmp_path / "c.safetensors", model)
    for a, b in zip(cache.spectral_layers, loaded.spectral_layers):
        assert a.tiers.n_cold == b.tiers.n_cold
        _same_tokens(a.tiers, b.tiers)
    assert out.shape == (1, 52)


def test_non_finite_tokens_are_refused_in_static_steps():
    st = TierManager(CFG.replace(compress_lag=2), name="layer 4")
    st.append(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8))
    st.freeze(40)
    bad = torch.randn(1, 2, 1, 8)
    bad[0, 1, 0, 3] = float("nan")
    # A captured step cannot look: the token (position 10, inside the first block) is stored, and
    # its block is refused when it would be swapped in (the graph driver also flags the logits).
    st.append_static(bad, torch.randn(1, 2, 1, 8))
    st.advance()
    with pytest.raises(ValueError, match=r"layer 4: keys/values of batch row\(s\) \[0\] hold NaN/Inf"):
        for _ in range(11 + 2):  # the block fills at 22 tokens, then 2 steps of lag
            st.append_static(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
            st.advance()
    assert st.n_cold == [0]


def _frozen_first_layer(model, seed):
    """Layer 0 of a cache frozen after a 30-token prompt (for direct eager static steps)."""
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(seed))
    cache = sk.SpectralCache(LOSSY, model.config)
    greedy(model, ids, n=1, past_key_values=cache)
    cache.freeze(8)
    return cache.spectral_layers[0]


def test_eager_static_steps_check_each_token_before_storing_it(model):
    layer = _frozen_first_layer(model, seed=9)
    before = layer.tiers.n_exact_t.clone()
    k = torch.full((1, layer.tiers.exact_k.shape[1], 1, layer.tiers.exact_k.shape[3]), float("inf"))
    with pytest.raises(ValueError, match="layer 0: keys of batch row"):
        layer.attend_and_commit(torch.randn(1, model.config.num_attention_heads, 1, k.shape[3]), k, torch.zeros_like(k), None, 1.0)
    assert torch.equal(layer.tiers.n_exact_t, before)  # nothing stored


def test_eos_stops_rows_like_generate(model):
    ids, mask = _left_padded(seed=10)
    free = StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, mask, max_new_tokens=40)
    new = free[:, ids.shape[1]:]
    both = set(new[0, 3:].tolist()) & set(new[1, 3:].tolist()) - set(new[:, :3].flatten().tolist())
    eos = min(both)  # a token both rows emit, not in their first 3 steps: make it the EOS id
    first = [int((new[r] == eos).nonzero()[0]) for r in range(2)]
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0, past_key_values=sk.SpectralCache(LOSSY, model.config))
    got = StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(
        ids, mask, max_new_tokens=40, eos_token_id=[eos], pad_token_id=0)
    assert torch.equal(got, expected)
    assert got.shape[1] == ids.shape[1] + max(first) + 1  # stopped when the last row finished
    for r in range(2):
        assert (got[r, ids.shape[1] + first[r] + 1 :] == 0).all()  # padded after its EOS
    with pytest.raises(ValueError, match="eos_token_id must be a token id or a list of them, got 'x'"):
        StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, mask, 4, eos_token_id="x")


def test_eager_static_steps_read_bool_and_additive_masks(model):
    layer = _frozen_first_layer(model, seed=11)
    h, d = layer.tiers.exact_k.shape[1], layer.tiers.exact_k.shape[3]
    q, k = torch.randn(1, model.config.num_attention_heads, 1, d), torch.randn(1, h, 1, d)
    width = layer.tiers.seen + 1
    padded = torch.ones(1, 1, 1, width, dtype=torch.bool)
    padded[..., -1] = False
    with pytest.raises(ValueError, match="takes decode tokens that are real tokens"):
        layer.attend_and_commit(q, k, k, padded, d**-0.5)
    additive = torch.zeros(1, 1, 1, width)  # transformers' float form: 0 = attend
    out = layer.attend_and_commit(q, k, k, additive, d**-0.5)
    assert out.shape == q.shape and layer.tiers.tokens() == [31]


# ---------------------------------------------------------------- property: any schedule
from hypothesis import given  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


@given(
    b=hst.integers(1, 3),
    prompt=hst.integers(1, 40),
    pad_p=hst.sampled_from([0.0, 0.3]),
    capacity=hst.integers(0, 40),
    lag=hst.integers(0, 6),
    events=hst.lists(hst.tuples(hst.sampled_from(["decode", "chunk", "reorder", "crop", "refreeze"]),
                                hst.integers(1, 30)), min_size=1, max_size=6),
    dtype=hst.sampled_from([torch.float32, torch.bfloat16]),
    seed=hst.integers(0, 2**16),
)
def test_any_static_schedule_holds_what_a_dynamic_twin_holds(b, prompt, pad_p, capacity, lag, events, dtype, seed):
    """Frozen and dynamic twins fed the same tokens through any mix of decode runs (static steps),
    prefill chunks, row reorders and crops (which thaw), and re-freezes with too little room (pool
    growth): always the same tokens, bit for bit, and the static counters agree with the host."""
    cfg = CFG.replace(block_size=8, hot_buffer_size=3, quant_group=8, compress_lag=min(lag, 7))
    g = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.randn(b, 2, t, 8, generator=g).to(dtype)  # noqa: E731
    dyn, st = TierManager(cfg), TierManager(cfg)
    k, v, valid = rand(prompt), rand(prompt), torch.rand(b, prompt, generator=g) >= pad_p
    valid[:, -1] = True  # every row ends on a real token (as generate's left padding does)
    for tm in (dyn, st):
        tm.append(k, v, valid)
    st.freeze(capacity)
    for kind, n in events:
        if kind == "decode":
            if not st.initialized:  # a crop emptied it: one token prefills it again
                ck, cv = rand(1), rand(1)
                for tm in (dyn, st):
                    tm.append(ck, cv)
            if not st.static:
                st.freeze(capacity)
            for _ in range(n):
                nk, nv = rand(1), rand(1)
                dyn.append(nk, nv)
                st.append_static(nk, nv)
                st.advance()
                assert st.n_exact_t.tolist() == st.n_exact and st.n_cold_t.tolist() == st.n_cold
        elif kind == "chunk":
            ck, cv = rand(n), rand(n)
            for tm in (dyn, st):
                tm.append(ck, cv)
        elif kind == "reorder":
            idx = torch.randint(0, b, (b,), generator=g)
            for tm in (dyn, st):
                tm.select_rows(idx)
        elif kind == "crop" and dyn.initialized:  # as far as crop is exact: real tokens of the exact tiers
            sinks = [cfg.sink_tokens if c else 0 for c in dyn.n_cold]
            drop = min(n, *dyn.tail_valid, *(e - s for e, s in zip(dyn.n_exact, sinks)))
            for tm in (dyn, st):
                tm.crop(-drop) if drop else None
        elif kind == "refreeze" and st.initialized:
            st.freeze(n % 3)
    st.drain()
    assert (st.tokens(), st.seen) == (dyn.tokens(), dyn.seen)
    _same_tokens(dyn, st)


def test_sampling_draws_what_generate_draws(model):
    ids, mask = _left_padded(seed=12)
    knobs = dict(temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(123)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=True, **knobs,
                                  past_key_values=sk.SpectralCache(LOSSY, model.config))
    torch.manual_seed(123)
    got = StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, mask, 30, do_sample=True, **knobs)
    assert torch.equal(got, expected)
    greedy_out = StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, mask, 30)
    assert not torch.equal(got, greedy_out)  # it really sampled
    for bad, match in ((dict(temperature=0), "temperature must be a positive number, got 0"),
                       (dict(top_k=-1), "top_k must be a non-negative int"),
                       (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5")):
        with pytest.raises(ValueError, match=match):
            StaticDecoder(model, sk.SpectralCache(LOSSY, model.config)).generate(ids, mask, 2, do_sample=True, **bad)


def test_static_views_plan_for_the_blocks_in_use():
    # frozen pools keep spare slots for the blocks to come; the view tells kernels how many are
    # in use (their launch plan), while validity stays with the device counts
    _, st = _decode_both(CFG, new_tokens=3, capacity=200)
    view = st.view(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
    assert view.static and view.cold_in_use == max(st.n_cold) > 0
    assert view.n_cold_blocks > view.cold_in_use  # the spare slots
    st.commit(advance=False)
