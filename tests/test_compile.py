"""torch.compile-first: each strategy's decode `attend` compiles with fullgraph=True (no graph
breaks) and does not recompile as the cache grows token by token and block by block."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import spectral_kv as sk
import spectral_kv.attention.fused as fused_mod
from spectral_kv import ATTENTION_STRATEGIES, SpectralConfig, TierManager
from spectral_kv.attention.compiled import compile_attend

CFG = SpectralConfig.preset("fast", block_size=8, k_rank_keys=4, k_rank_values=4, hot_buffer_size=3, sink_tokens=2)
# The default layout: one rotation shared by all blocks (the spectral strategy's shared-basis path).
HADAMARD = SpectralConfig(block_size=8, hot_buffer_size=3, sink_tokens=2, quant_group=8)
# Per-block SVD basis for the keys, the shared rotation for the values.
MIXED = CFG.replace(value_compressor="hadamard", value_bits=3, quant_group=8, k_rank_values=None)
B, H, G, D = 2, 2, 3, 8


def grow_and_attend(name, attend, steps, prompt=5, seed=0, cfg=CFG, tm=None):
    """Decode `steps` tokens through a TierManager (a fresh one unless `tm`); returns
    (max abs diff vs eager, cold blocks)."""
    g = torch.Generator().manual_seed(seed)
    tm = TierManager(cfg) if tm is None else tm
    eager = ATTENTION_STRATEGIES[name](cfg, tm.key_compressor, tm.value_compressor)
    tm.append(torch.randn(B, H, prompt, D, generator=g), torch.randn(B, H, prompt, D, generator=g))
    worst = 0.0
    for _ in range(steps):
        q = torch.randn(B, H * G, 1, D, generator=g)
        nk, nv = torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
        args = (q, tm.view(nk, nv), D**-0.5)  # the tiers plus the staged token
        worst = max(worst, float((attend(*args) - eager.attend(*args)).abs().max()))
        tm.commit()
    return worst, tm.n_cold[0]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Dynamo caches graphs per code object (all strategies share SpectralAttention.attend's)
    # up to a recompile limit of 8: each test counts its own graphs from an empty cache.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fused_fallback(monkeypatch):
    # On CPU the `fused` strategy compiles its torch fallback (the kernel itself is a
    # triton_op; under the interpreter it has no compiled form to check here).
    monkeypatch.setattr(fused_mod, "_kernel_runs_on", lambda t: False)


@pytest.mark.slow  # ~5-20 s each on 2 shared cores: Dynamo traces two graphs
@pytest.mark.parametrize(
    "name, cfg",
    [("spectral", CFG), ("reconstruct", CFG), ("fused", CFG), ("spectral", HADAMARD), ("spectral", MIXED)],
    ids=["spectral", "reconstruct", "fused", "spectral-hadamard", "spectral-svd-keys-hadamard-values"],
)
def test_attend_fullgraph_and_bounded_recompiles(name, cfg, request):
    if name == "fused":
        request.getfixturevalue("fused_fallback")
    # The strategy shares the compressors that fill the tiers, as in SpectralCache: hadamard's
    # rotation is built (and cached) by the first compress, before a cold block reaches attend;
    # built inside the first trace instead, the cache's new entry would cost one more graph.
    tm = TierManager(cfg)
    strategy = ATTENTION_STRATEGIES[name](cfg, tm.key_compressor, tm.value_compressor)
    counter = CompileCounter()
    # fullgraph=True: any graph break raises instead of splitting the frame.
    attend = compile_attend(strategy, backend=counter)
    # 6 cold blocks of 8 tokens and the exact tier growing 3 -> 13 tokens between compressions.
    worst, n_cold = grow_and_attend(name, attend, steps=6 * 8 + 2, cfg=cfg, tm=tm)
    assert n_cold == 6
    assert worst < 1e-5
    # One graph before the first cold block, one after: none per block or per token.
    assert counter.frame_count <= 2, counter.frame_count


@pytest.mark.slow
def test_plain_torch_compile_would_recompile_per_block():
    # The bound above is not vacuous: without compile_attend's shape settings the block count
    # is specialised at 1, and the second block costs another graph.
    strategy = ATTENTION_STRATEGIES["spectral"](CFG, *(lambda t: (t.key_compressor, t.value_compressor))(TierManager(CFG)))
    counter = CompileCounter()
    attend = torch.compile(strategy.attend, backend=counter, fullgraph=True, dynamic=True)
    grow_and_attend("spectral", attend, steps=2 * 8 + 1)  # attends over 0, 1 and 2 blocks
    assert counter.frame_count >= 3


def test_graph_break_is_reported():
    # fullgraph=True turns a host sync in attend into an error, which is what the test relies on.
    class Syncing(type(ATTENTION_STRATEGIES["spectral"](CFG, *(lambda t: (t.key_compressor, t.value_compressor))(TierManager(CFG))))):
        def attend(self, q, *args):
            if bool(q.sum() > 0):  # data-dependent Python branch
                return super().attend(q, *args)
            return super().attend(-q, *args)

    tm = TierManager(CFG)
    attend = compile_attend(Syncing(CFG, tm.key_compressor, tm.value_compressor), backend=CompileCounter())
    with pytest.raises(Exception, match="(?i)data.dependent|graph break|Unsupported"):
        grow_and_attend("spectral", attend, steps=1)


@pytest.mark.slow
def test_inductor_compiled_spectral_matches_eager():
    # The real backend once (CPU Inductor), across the no-cold -> cold transition.
    strategy = ATTENTION_STRATEGIES["spectral"](CFG, *(lambda t: (t.key_compressor, t.value_compressor))(TierManager(CFG)))
    torch._dynamo.reset()
    worst, n_cold = grow_and_attend("spectral", compile_attend(strategy), steps=8 + 2)
    assert n_cold == 1 and worst < 1e-4


@pytest.mark.slow
def test_config_compile_runs_generate_through_compiled_attend(monkeypatch):
    import spectral_kv.integrations.transformers.cache as tr
    from spectral_kv.eval.tiny import tiny_random_model

    counters = []

    def counting(strategy):
        counters.append(CompileCounter())
        return compile_attend(strategy, backend=counters[-1])

    monkeypatch.setattr(tr, "compile_attend", counting)
    model, _ = tiny_random_model(head_dim=16)
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    cfg = SpectralConfig(block_size=16, k_rank_keys=16, k_rank_values=16, hot_buffer_size=3, sink_tokens=2,
                         compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False)
    outs = []
    for compile_ in (False, True):
        cache = sk.SpectralCache(cfg.replace(compile=compile_), model.config)
        model.config._attn_implementation = "spectral_kv"
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                       do_sample=False, past_key_values=cache))
    assert torch.equal(outs[0], outs[1])
    assert len(counters) == 2  # one compiled attend per layer
    assert all(1 <= c.frame_count <= 2 for c in counters), [c.frame_count for c in counters]
