"""Serving checks on CUDA: save/load, crop/assisted decoding, and a model split over 2 GPUs.

1. (1+ GPU) a lossy SpectralCache built on CUDA, saved, loaded back onto the GPU, continues
   generation token-identically; assisted decoding (crop) with a lossless cache == DynamicCache.
2. (2+ GPUs) a tiny Llama saved to a temp dir and loaded with accelerate (``device_map`` putting
   half the decoder layers on each GPU): greedy output with SpectralCache (lossless: equal to
   DynamicCache; lossy: equal to the same cache on one GPU; strategies spectral and fused) and every
   layer's tier tensors on that layer's device; a cache saved from the split model loads back onto
   each layer's device.
Prints a report; exits non-zero on any failed check. With one GPU, part 2 is reported SKIPPED.

    python tests/gpu/multi_gpu.py | tee tests/gpu/results_multi_gpu_<card>.txt
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import spectral_kv as sk  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from checks import check, finish  # noqa: E402

def greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kw)


def tiny_llama(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=2048,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


LOSSLESS = sk.SpectralConfig(block_size=32, k_rank_keys=16, k_rank_values=16, hot_buffer_size=8, sink_tokens=2,
                             compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False)
LOSSY = sk.SpectralConfig.preset("fast", block_size=32, k_rank_keys=6, k_rank_values=8, hot_buffer_size=8, sink_tokens=4, verbose=False)

n_gpu = torch.cuda.device_count()
print(f"devices: {[torch.cuda.get_device_name(i) for i in range(n_gpu)]}  torch {torch.__version__}  "
      f"transformers {transformers.__version__}")

# ---------------------------------------------------------------- 1. one GPU
model = tiny_llama().cuda()
model.set_attn_implementation("spectral_kv")
ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(1)).cuda()
cache = sk.SpectralCache(LOSSY, model.config)
out = greedy(model, ids, 20, past_key_values=cache)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "cache.safetensors")
    cache.save(path)
    loaded = sk.SpectralCache.load(path, model)
    on_gpu = all(t.device.type == "cuda" for layer in loaded.spectral_layers for t in layer.tiers.held_tensors())
    a = greedy(model, out, 20, past_key_values=cache)
    b = greedy(model, out, 20, past_key_values=loaded)
    blocks = sum(sum(layer.tiers.n_cold) for layer in loaded.spectral_layers)
    check("cuda: saved+loaded lossy cache continues token-identically", torch.equal(a, b) and on_gpu,
          f"cold blocks={blocks}, tiers on cuda={on_gpu}")

assistant = tiny_llama(layers=1, seed=1).cuda()
assistant.generation_config.num_assistant_tokens = 6
assistant.generation_config.num_assistant_tokens_schedule = "constant"
ids1 = ids[:1, :90]
ref = greedy(model, ids1, 40, past_key_values=DynamicCache(), assistant_model=assistant)
got = greedy(model, ids1, 40, past_key_values=sk.SpectralCache(LOSSLESS, model.config), assistant_model=assistant)
check("cuda: assisted decoding (crop) lossless == DynamicCache", torch.equal(got, ref))

# ---------------------------------------------------------------- 2. two GPUs
if n_gpu < 2:
    print("SKIPPED  multi-GPU checks: need 2 GPUs, found", n_gpu)
else:
    with tempfile.TemporaryDirectory() as tmp:
        tiny_llama().save_pretrained(tmp)
        n_layers = 4
        device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
        device_map.update({f"model.layers.{i}": (0 if i < n_layers // 2 else 1) for i in range(n_layers)})
        split = AutoModelForCausalLM.from_pretrained(tmp, device_map=device_map, attn_implementation="spectral_kv").eval()
        single = AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="spectral_kv").cuda(0).eval()
    layer_dev = [next(layer.parameters()).device for layer in split.model.layers]
    print("layer devices:", [str(d) for d in layer_dev])
    check("model really split over 2 GPUs", len(set(layer_dev)) == 2)
    ids0 = ids.to("cuda:0")
    ref = greedy(single, ids0, 40, past_key_values=DynamicCache())
    for attention in ("spectral", "fused"):
        for name, cfg in (("lossless", LOSSLESS), ("lossy", LOSSY)):
            cfg = cfg.replace(attention=attention)
            one = greedy(single, ids0, 40, past_key_values=sk.SpectralCache(cfg, single.config))
            cache = sk.SpectralCache(cfg, split.config)
            try:
                two = greedy(split, ids0, 40, past_key_values=cache)
            except Exception as exc:  # report, keep going
                check(f"split {attention} {name}: generate", False, f"{type(exc).__name__}: {exc}")
                continue
            placed = all(t.device == dev for layer, dev in zip(cache.spectral_layers, layer_dev)
                         for t in layer.tiers.held_tensors())
            blocks = sum(sum(layer.tiers.n_cold) for layer in cache.spectral_layers)
            check(f"split {attention} {name}: output == single-GPU run", torch.equal(two.cpu(), one.cpu()),
                  f"cold blocks={blocks}")
            if name == "lossless":
                check(f"split {attention} lossless == DynamicCache", torch.equal(two.cpu(), ref.cpu()))
            check(f"split {attention} {name}: each layer's tiers on its layer's device", placed)
    # Static storage + background compression on the split model (eager steps: one CUDA graph
    # cannot span two devices' streams); side streams are per layer's device.
    cfg = LOSSY.replace(compress_lag=4)
    one = sk.StaticDecoder(single, sk.SpectralCache(cfg, single.config)).generate(ids0, max_new_tokens=40)
    cache = sk.SpectralCache(cfg, split.config)
    two = sk.StaticDecoder(split, cache, use_cuda_graph=False).generate(ids0, max_new_tokens=40)
    placed = all(t.device == dev for layer, dev in zip(cache.spectral_layers, layer_dev) for t in layer.tiers.held_tensors())
    check("split: static decoder with compress_lag (eager) == single-GPU graphed run", torch.equal(two.cpu(), one.cpu()),
          f"placed={placed}")
    check("split: static tiers on each layer's device", placed)
    cache = sk.SpectralCache(LOSSY, split.config)
    out = greedy(split, ids0, 10, past_key_values=cache)
    with tempfile.TemporaryDirectory() as tmp:
        cache.save(os.path.join(tmp, "c.safetensors"))
        loaded = sk.SpectralCache.load(os.path.join(tmp, "c.safetensors"), split)
    placed = all(t.device == dev for layer, dev in zip(loaded.spectral_layers, layer_dev) for t in layer.tiers.held_tensors())
    same = torch.equal(greedy(split, out, 15, past_key_values=loaded), greedy(split, out, 15, past_key_values=cache))
    check("split: loaded cache lands on each layer's device and continues identically", placed and same,
          f"placed={placed}, same={same}")

finish()
