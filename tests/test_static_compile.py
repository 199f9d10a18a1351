"""`StaticDecoder(compile=...)`: the decode forward through torch.compile computes what the plain
one computes, with no graph break, and recompiles only when the cache's block count changes."""

import pytest
import torch
import torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM

import spectral_kv  # noqa: F401  (registers the attention)
from spectral_kv import SpectralCache, SpectralConfig, StaticDecoder


def _model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    cfg._attn_implementation = "spectral_kv"
    return LlamaForCausalLM(cfg).eval()


def test_compiled_decode_steps_equal_plain_ones_without_graph_breaks():
    model = _model()
    ids = torch.randint(0, 128, (2, 150))
    sc = SpectralConfig(block_size=32, hot_buffer_size=8, sink_tokens=4, verbose=False)
    plain = StaticDecoder(model, SpectralCache(sc, model.config), use_cuda_graph=False)
    ref = plain.generate(ids, max_new_tokens=40)  # 150 + 40 tokens: blocks are compressed while decoding
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cache = SpectralCache(sc, model.config)
    out = StaticDecoder(model, cache, use_cuda_graph=False, compile="aot_eager").generate(ids, max_new_tokens=40)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 189
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    # one graph per number of cold blocks in use (the kernel's launch plan), not one per step
    blocks = {len(range(0, n - 4 - 8, 32)) for n in range(150, 190)}
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= len(blocks) + 1


@pytest.mark.parametrize("bad", [1, "", None, 0.5])
def test_compile_argument_is_checked(bad):
    model = _model()
    with pytest.raises(ValueError, match="compile"):
        StaticDecoder(model, SpectralCache(SpectralConfig(verbose=False), model.config), use_cuda_graph=False, compile=bad)
