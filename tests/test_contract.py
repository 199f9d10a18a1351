"""The contract matrix: every registered compressor x every strategy that claims to serve it x
dynamic / static storage runs the same properties. A new plug-in is tested by registering it
(tests/plugins.py registers a stateful one, ``test_pca``, for the per-row shared-state contract).

Properties: lossless settings reproduce exact attention over every real token; tokens are
conserved and ordered; bytes reported == bytes held; a state_dict round trip through
safetensors bytes (what `SpectralCache.save` writes) is bit for bit; row operations carry
every tier (shared state included).
"""

import json

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import plugins  # noqa: F401  (registers the test-only plug-ins)
from spectral_kv import SpectralConfig, TierManager
from spectral_kv.attention import reference_attention
from spectral_kv.registry import ATTENTION_STRATEGIES, COMPRESSORS

B, H, G, D, BS = 2, 2, 2, 16, 16
SCALE = D**-0.5


def _config(compressor: str, attention: str, storage: str) -> SpectralConfig:
    # Full rank, unquantized, float32 bases: lossless wherever the compressor allows it. Only the
    # layout fields the compressor reads are set (setting one it ignores is refused by name).
    layout = dict(k_rank_keys=D, k_rank_values=D, coeff_bits=None, value_bits="same", basis_dtype="float32",
                  quant_group=8)
    cls = COMPRESSORS[compressor]
    probe = SimpleNamespace(value_bits="same", segments=lambda role: None)  # what `reads` looks at
    read = cls.reads(probe, "keys") | cls.reads(probe, "values")
    return SpectralConfig(compressor=compressor, attention=attention, block_size=BS, hot_buffer_size=3, sink_tokens=2,
                          compress_lag=2 if storage == "static" else 0, verbose=False,
                          **{k: v for k, v in layout.items() if k in read})


def _matrix():
    for comp in COMPRESSORS.names():
        cls = COMPRESSORS[comp]
        for name in ATTENTION_STRATEGIES.names():
            if ATTENTION_STRATEGIES[name].serves(cls, cls):
                for storage in ("dynamic", "static"):
                    yield pytest.param(comp, name, storage, id=f"{comp}-{name}-{storage}")


MATRIX = list(_matrix())
# Plug-ins registered on import (another test may register one inside its own body later).
REGISTERED = COMPRESSORS.names()


def _lossless(cfg: SpectralConfig) -> bool:
    return all(COMPRESSORS[cfg.compressor_name(r)].effective_bits(cfg, r) is None for r in ("keys", "values"))


def _drive(cfg: SpectralConfig, storage: str, seed: int = 0):
    """A left-padded prompt, then decode steps (and, dynamic, a 3-token chunk) through
    view -> attend -> commit. Returns the tiers, the real tokens per row and the worst error
    against float64 attention over those tokens."""
    g = torch.Generator().manual_seed(seed)
    tm = TierManager(cfg)
    strategy = ATTENTION_STRATEGIES[cfg.attention](cfg, tm.key_compressor, tm.value_compressor)
    n = 2 * BS + 7
    k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    valid = torch.ones(B, n, dtype=torch.bool)
    valid[1, :9] = False  # row 1 fills its blocks later than row 0
    tm.append(k, v, valid)
    real = [[k[b][:, valid[b]], v[b][:, valid[b]]] for b in range(B)]
    steps = BS + 5
    if storage == "static":
        tm.freeze(steps)
    worst = 0.0
    chunks = [1] * steps + ([3] if storage == "dynamic" else [])
    for tq in chunks:
        q = torch.randn(B, H * G, tq, D, generator=g)
        nk, nv = torch.randn(B, H, tq, D, generator=g), torch.randn(B, H, tq, D, generator=g)
        view = tm.view(nk, nv)
        assert view.static == (storage == "static" and tq == 1)
        out = strategy.attend(q, view, SCALE)
        tm.commit()
        for b in range(B):
            real[b] = [torch.cat((real[b][0], nk[b]), 1), torch.cat((real[b][1], nv[b]), 1)]
            keys, values = real[b]
            m = keys.shape[1]
            mask = torch.ones(1, 1, tq, m, dtype=torch.bool)
            mask[..., m - tq :] = torch.ones(tq, tq, dtype=torch.bool).tril()
            ref = reference_attention(q[b : b + 1], keys[None], values[None], mask, SCALE)
            worst = max(worst, float((out[b : b + 1].double() - ref).abs().max()))
    return tm, real, worst


@pytest.mark.parametrize("compressor, attention, storage", MATRIX)
def test_contract(compressor, attention, storage):
    cfg = _config(compressor, attention, storage)
    tm, real, worst = _drive(cfg, storage)
    assert min(tm.n_cold) >= 2, tm.n_cold  # the property ran over cold blocks, ragged rows
    if _lossless(cfg):
        assert worst < 1e-4, worst  # lossless at full precision == exact attention

    # tokens conserved and ordered: every real token appended, in order (exact ones bit for bit)
    tm.drain()
    assert tm.tokens() == [r[0].shape[1] for r in real]
    keys, values, _ = tm.materialize()
    for b in range(B):
        n = real[b][0].shape[1]
        if _lossless(cfg):
            assert torch.allclose(keys[b, :, :n], real[b][0], atol=1e-5)
            assert torch.allclose(values[b, :, :n], real[b][1], atol=1e-5)
        tail = tm.n_exact[b] - cfg.sink_tokens
        assert torch.equal(keys[b, :, n - tail : n], real[b][0][:, n - tail :])  # warm + hot: exact
        assert torch.equal(keys[b, :, : cfg.sink_tokens], real[b][0][:, : cfg.sink_tokens])  # sinks: exact

    # bytes reported == bytes held (shared per-row state counted as cold bytes)
    rep = tm.memory_report()
    held = sum(t.numel() * t.element_size() for t in tm.held_tensors())
    assert rep["total_bytes"] == held
    cold = sum(t.numel() * t.element_size() for t in tm.cold.tensors())
    assert rep["cold_keys"] + rep["cold_values"] == cold > 0

    # save / load round trip through safetensors bytes: bit for bit, and the next step agrees
    state = tm.state_dict()
    tensors = {n: t.contiguous() for n, t in state.items() if isinstance(t, torch.Tensor)}
    meta = json.dumps({n: x for n, x in state.items() if not isinstance(x, torch.Tensor)})
    loaded = {**st_load(st_save(tensors)), **json.loads(meta)}
    tm2 = TierManager(cfg)
    tm2.load_state_dict(loaded)
    assert sorted(n for n in tm2.state_dict() if isinstance(tm2.state_dict()[n], torch.Tensor)) == sorted(tensors)
    for a, b in zip(tm.materialize()[:2], tm2.materialize()[:2]):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    q, nk, nv = torch.randn(B, H * G, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g), torch.randn(B, H, 1, D, generator=g)
    outs = []
    for t in (tm, tm2):
        s = ATTENTION_STRATEGIES[attention](cfg, t.key_compressor, t.value_compressor)
        outs.append(s.attend(q, t.view(nk, nv), SCALE))
        t.commit()
    assert torch.equal(outs[0], outs[1])

    # row operations carry every tier, shared state included
    before, counts = tm.materialize()[:2], tm.tokens()
    tm.select_rows(torch.tensor([1, 1, 0]))
    after = tm.materialize()[:2]
    assert tm.tokens() == [counts[1], counts[1], counts[0]]
    for x, y in zip(before, after):
        for new_row, old_row in ((0, 1), (1, 1), (2, 0)):
            n = counts[old_row]
            assert torch.equal(y[new_row, :, :n], x[old_row, :, :n])
    for shared in (tm.cold.shared_k, tm.cold.shared_v):
        for t in shared.values():
            assert t.shape[0] == 3


def test_matrix_covers_every_plug_in():
    # Registering is enough: every compressor appears, with every strategy that serves it.
    ids = {p.id for p in MATRIX}
    for comp in REGISTERED:
        assert any(i.startswith(f"{comp}-") for i in ids), comp
    assert {"test_pca-spectral-static", "test_pca-reconstruct-dynamic", "kivi4-reconstruct-static"} <= ids
    # KIVI is factored in the identity basis: spectral and the fused kernel serve it.
    assert {"kivi4-spectral-static", "kivi4-fused-dynamic", "hadamard-fused-static"} <= ids
    assert "test_raw-reconstruct-dynamic" in ids
    assert not any(i.startswith(("test_raw-spectral", "test_raw-fused")) for i in ids)  # not factored: refused
