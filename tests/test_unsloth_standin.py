"""A faithful stand-in for Unsloth's gated CUDA fast path (>= 2026.10.9), runnable on CPU.

What it reproduces (file:line into the unsloth 2026.10.9 wheel, see UNSLOTH_NOTES.md):
* class methods replaced by wrappers that dispatch on ``self._unsloth_fast_path`` and carry
  ``_unsloth_gated`` (``_gated_method``, llama.py:3300-3310) - done here on private subclasses
  swapped into the model's modules, so no transformers class of the test session changes;
* every module marked with the flag (``mark_unsloth_fast_path``, llama.py:3313-3316);
* a fast attention that ignores ``attn_implementation`` and the transformers ``Cache`` and keeps
  K/V in ``paged_attention`` buffers on the attention module (llama.py:718-792,
  _decode_graphs.py:167-250), deleted again by the next prefill (llama.py:1077-1084);
* the instance ``generate`` = ``unsloth_fast_generate`` over ``_old_generate`` that keeps a
  caller's Cache, drops the paged buffers when one is passed and otherwise forces
  ``cache_implementation="dynamic"`` (llama.py:2954-3058, 4531-4534).
The "ungated" flavour assigns the fast functions without a gate or flags (Unsloth <= 2026.10.8).
"""

from __future__ import annotations

import functools
import sys
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as ml

from spectral_kv import SpectralCache
from spectral_kv.integrations.unsloth import (
    UnsupportedUnslothError,
    detect_unsloth_path,
    patch_unsloth_attention,
)

LOSSLESS = dict(  # full rank (head_dim 16), unquantized fp32 bases: compression must change nothing
    block_size=16, hot_buffer_size=2, k_rank_keys=16, k_rank_values=16, sink_tokens=1,
    compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False,
)
NEW = 24


def _config():
    return LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )


# ------------------------------------------------------------------ the stand-in "Unsloth"
def _fast_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
    """Eager attention over the module's own paged buffer; never touches the Cache."""
    self._standin_fast_calls = self.__dict__.get("_standin_fast_calls", 0) + 1
    bsz, q_len, _ = hidden_states.shape
    hd = self.head_dim
    q = self.q_proj(hidden_states).view(bsz, q_len, -1, hd).transpose(1, 2)
    k = self.k_proj(hidden_states).view(bsz, q_len, -1, hd).transpose(1, 2)
    v = self.v_proj(hidden_states).view(bsz, q_len, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
    if q_len > 1 and "paged_attention" in self.__dict__:  # a new prefill drops the old buffers
        for name in ("paged_attention", "paged_attention_K", "paged_attention_V", "temp_QA", "RH_Q", "attention"):
            self.__dict__.pop(name, None)
    new = torch.stack((k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)), dim=1)  # [T, 2, B, H, D]
    if "paged_attention" not in self.__dict__:
        self.paged_attention = new
        self.temp_QA = torch.empty(2, bsz, 1, q.shape[1] * hd)
        self.RH_Q = torch.empty(bsz, q.shape[1], 1, hd)
        self.attention = torch.empty(bsz, q.shape[1], 1, 64)
    else:
        self.paged_attention = torch.cat((self.paged_attention, new), 0)
    self.paged_attention_K = self.paged_attention[:, 0]
    self.paged_attention_V = self.paged_attention[:, 1]
    K = ml.repeat_kv(self.paged_attention_K.permute(1, 2, 0, 3), self.num_key_value_groups)
    V = ml.repeat_kv(self.paged_attention_V.permute(1, 2, 0, 3), self.num_key_value_groups)
    out = torch.nn.functional.scaled_dot_product_attention(q, K, V, is_causal=q_len > 1, scale=self.scaling)
    out = out.transpose(1, 2).reshape(bsz, q_len, -1)
    return self.o_proj(out), None


def _fast_decoder_forward(self, *args, **kwargs):
    self._standin_fast_calls = self.__dict__.get("_standin_fast_calls", 0) + 1
    return ml.LlamaDecoderLayer.forward(self, *args, **kwargs)


for _fn in (_fast_attention_forward, _fast_decoder_forward):
    _fn.__module__ = "unsloth.models.llama"  # where Unsloth's fast forwards live


def _gated_method(cls, name, fast, original):
    """Same dispatch as unsloth/models/llama.py:3300-3310."""

    @functools.wraps(fast)
    def gated(self, *args, **kwargs):
        if getattr(self, "_unsloth_fast_path", False):
            return fast(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    gated._unsloth_gated = True
    return gated


def _standin_classes(gated: bool):
    fast = {ml.LlamaAttention: _fast_attention_forward, ml.LlamaDecoderLayer: _fast_decoder_forward}
    out = {}
    for base, fn in fast.items():
        method = _gated_method(base, "forward", fn, base.forward) if gated else fn
        out[base] = type(base.__name__, (base,), {"forward": method, "__module__": base.__module__})
    return out


_CLASSES = {True: _standin_classes(True), False: _standin_classes(False)}


def unsloth_fast_generate(self, *args, **kwargs):
    """The parts of unsloth_fast_generate (llama.py:2954-3058) that matter for a cache."""
    if kwargs.get("past_key_values") is not None:
        for module in self.modules():
            if "paged_attention" in module.__dict__:
                del module.paged_attention_K, module.paged_attention_V, module.paged_attention
    else:
        kwargs["cache_implementation"] = "dynamic"
    with torch.inference_mode():
        return self._old_generate(*args, **kwargs)


class UnslothRotaryEmbedding(ml.LlamaRotaryEmbedding):
    """Unsloth replaces transformers' rotary class by its own (a module global, llama.py:3479-3484),
    defined in unsloth.models.llama and never gated; it serves stock callers (llama.py:2509-2523)."""

    def forward(self, x, position_ids=None):
        return super().forward(x, position_ids)


UnslothRotaryEmbedding.__module__ = "unsloth.models.llama"
UnslothRotaryEmbedding.forward.__module__ = "unsloth.models.llama"


def load_standin(gated: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config()).eval()
    for module in model.modules():
        cls = _CLASSES[gated].get(type(module))
        if cls is not None:
            module.__class__ = cls
    if gated:
        for module in model.modules():
            module._unsloth_fast_path = True
    # Swapped in after marking, as Unsloth's post_patch does for some modules: no flag on it
    # (seen on the real H100 run: not every module carries the flag after from_pretrained).
    model.model.rotary_emb.__class__ = UnslothRotaryEmbedding
    model.model.rotary_emb.__dict__.pop("_unsloth_fast_path", None)
    model._old_generate = model.generate
    model.generate = types.MethodType(unsloth_fast_generate, model)
    return model


def fast_calls(model) -> int:
    return sum(m.__dict__.get("_standin_fast_calls", 0) for m in model.modules())


def flags(model):
    return [m.__dict__.get("_unsloth_fast_path", "absent") for m in model.modules()]


@pytest.fixture
def fake_unsloth(monkeypatch):
    """Pin the 'installed' Unsloth version the patch reports (the real one may be imported too)."""

    def install(version):
        module = types.ModuleType("unsloth")
        module.__version__ = version
        monkeypatch.setitem(sys.modules, "unsloth", module)

    install("2026.10.9")
    return install


PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45]])


def _gen(model, **kw):
    return model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW, do_sample=False, **kw)


# ------------------------------------------------------------------ tests
def test_detection_by_features(fake_unsloth):
    assert detect_unsloth_path(load_standin(gated=True)) == "unsloth_gated"
    assert detect_unsloth_path(load_standin(gated=False)) == "unsloth_ungated"
    torch.manual_seed(0)
    assert detect_unsloth_path(LlamaForCausalLM(_config())) == "transformers"
    fm = LlamaForCausalLM(_config())

    def unsloth_base_fast_generate(self, *a, **k):  # FastModel's wrapper name (vision.py:4837-4843)
        return self._old_generate(*a, **k)

    fm._old_generate = fm.generate
    fm.generate = types.MethodType(unsloth_base_fast_generate, fm)
    assert detect_unsloth_path(fm) == "unsloth_fastmodel"
    with pytest.raises(UnsupportedUnslothError, match="FastModel"):
        patch_unsloth_attention(fm, verbose=False)


def test_standin_fast_path_really_bypasses_transformers(fake_unsloth):
    # Guards the stand-in itself: unpatched, the fast path must fill its buffers and not the Cache.
    model = load_standin()
    cache = SpectralCache(model_config=model.config, **LOSSLESS)
    _gen(model, past_key_values=cache)
    assert cache.get_seq_length() == 0  # the fast forward never calls cache.update
    assert fast_calls(model) > 0
    model = load_standin()
    _gen(model)
    assert any("paged_attention" in m.__dict__ for m in model.modules())


def test_gated_patch_routes_spectral_and_unpatch_restores(fake_unsloth, capsys):
    model, other = load_standin(seed=0), load_standin(seed=0)
    reference = _gen(model)  # the fast path's tokens
    before_flags = flags(model)
    original_generate = model.generate
    assert any("paged_attention" in m.__dict__ for m in model.modules())

    patch = patch_unsloth_attention(model, **{**LOSSLESS, "verbose": True})
    assert patch.path == "unsloth_gated"
    assert "path = unsloth_gated" in capsys.readouterr().out
    assert all(f is False for f in flags(model))
    assert not any("paged_attention" in m.__dict__ or "temp_QA" in m.__dict__ for m in model.modules())
    assert patch.dropped_buffers > 0
    assert flags(other) == before_flags, "another model lost its fast path"
    assert type(model.model.layers[0].self_attn).forward is type(other.model.layers[0].self_attn).forward

    calls_before = fast_calls(model)
    out = _gen(model)
    assert fast_calls(model) == calls_before, "the fast path still ran"
    assert torch.equal(out, reference)
    cache = patch.last_cache
    assert cache.get_seq_length() == PROMPT.shape[1] + NEW - 1
    assert cache.memory_report()["per_layer"][0]  # report is readable
    assert sum(sum(layer.tiers.n_cold) for layer in cache.spectral_layers) > 0, "nothing was compressed"
    assert patch.spectral_calls == model.config.num_hidden_layers * NEW
    assert "first generate OK" in capsys.readouterr().out

    other_calls = fast_calls(other)
    assert torch.equal(_gen(other), reference)
    assert fast_calls(other) > other_calls, "the other model should still run the fast path"

    patch.unpatch()
    assert flags(model) == before_flags
    assert model.generate.__func__ is original_generate.__func__
    assert model.config._attn_implementation != "spectral_kv"
    calls_before = fast_calls(model)
    assert torch.equal(_gen(model), reference)
    assert fast_calls(model) > calls_before, "unpatch did not restore the fast path"


def test_get_peft_model_remark_is_undone(fake_unsloth):
    model = load_standin()
    before = flags(model)
    patch = patch_unsloth_attention(model, **LOSSLESS)
    for module in model.modules():  # what get_peft_model's mark_unsloth_fast_path does (llama.py:5450)
        module._unsloth_fast_path = True
    with pytest.warns(RuntimeWarning, match="switched back on"):
        _gen(model)
    assert patch.spectral_calls > 0 and patch.last_cache.get_seq_length() == PROMPT.shape[1] + NEW - 1
    patch.unpatch()
    assert flags(model) == before  # the state before patching, not the re-marked one


def test_ungated_raises_naming_versions(fake_unsloth):
    fake_unsloth("2026.10.8")
    model = load_standin(gated=False)
    with pytest.raises(UnsupportedUnslothError, match=r"2026\.10\.8.*2026\.10\.9"):
        patch_unsloth_attention(model, verbose=False)
    assert model.config._attn_implementation != "spectral_kv"  # nothing half-applied


def test_gated_features_with_old_version_refused(fake_unsloth):
    fake_unsloth("2026.10.8")
    model = load_standin(gated=True)
    before = flags(model)
    with pytest.raises(UnsupportedUnslothError, match="2026.10.8"):
        patch_unsloth_attention(model, verbose=False)
    assert flags(model) == before


def test_bypass_is_reported(fake_unsloth):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config()).eval()
    patch = patch_unsloth_attention(model, **LOSSLESS)
    assert patch.path == "transformers"
    model.config._attn_implementation = "sdpa"  # something switched attention back behind our back
    with pytest.warns(RuntimeWarning, match="never called the spectral attention"):
        _gen(model)
    assert patch.spectral_calls == 0


def test_double_patch_refused(fake_unsloth):
    model = load_standin()
    patch = patch_unsloth_attention(model, **LOSSLESS)
    with pytest.raises(RuntimeError, match="already patched"):
        patch_unsloth_attention(model, **LOSSLESS)
    patch.unpatch()
    patch_unsloth_attention(model, **LOSSLESS).unpatch()
