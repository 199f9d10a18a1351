"""spectral_kv on a CUDA GPU with the image's transformers (5.17): run on the device machine.

1. tiny Llama / Qwen3 / Mistral in fp32 on CUDA: lossless settings -> greedy tokens equal to
   DynamicCache (spectral and fused strategies);
2. bf16, library defaults scaled down (int8, fp16 basis): the `fused` strategy's Triton kernel
   serves every decode step and its tokens/logits match the torch `spectral` strategy.
Prints a report; exits non-zero on any failed check.

    python3 tests/gpu/spectral_gpu.py | tee tests/gpu/results_spectral_<card>.txt
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import spectral_kv as sk  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from checks import check, finish  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_integration import tiny  # noqa: E402

def greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kw)


print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}")
lossless = sk.SpectralConfig(block_size=16, k_rank_keys=16, k_rank_values=16, hot_buffer_size=4, sink_tokens=2,
                             compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", verbose=False)
for arch in ("llama", "qwen3", "mistral"):
    model = tiny(arch).cuda()
    ids = torch.randint(1, 96, (2, 70), generator=torch.Generator().manual_seed(0)).cuda()
    ref = greedy(model, ids, 40, past_key_values=DynamicCache()).sequences
    for attention in ("spectral", "fused"):
        patch = sk.patch_unsloth_attention(model, config=lossless.replace(attention=attention))
        out = greedy(model, ids, 40).sequences
        patch.unpatch()
        blocks = sum(sum(layer.tiers.n_cold) for layer in patch.last_cache.spectral_layers)
        check(f"{arch} fp32 cuda lossless {attention} (fused: torch fallback, unquantized) == DynamicCache", torch.equal(out, ref), f"cold blocks={blocks}")

lossy = sk.SpectralConfig.preset("fast", block_size=32, k_rank_keys=8, k_rank_values=12, hot_buffer_size=8, sink_tokens=4, verbose=False)
model = tiny("llama").cuda().to(torch.bfloat16)
ids = torch.randint(1, 96, (3, 150), generator=torch.Generator().manual_seed(1)).cuda()
results = {}
for attention in ("spectral", "fused"):
    patch = sk.patch_unsloth_attention(model, config=lossy.replace(attention=attention))
    out = greedy(model, ids, 60)
    patch.unpatch()
    results[attention] = (out, patch.last_cache)
fused_layers = [layer.strategy for layer in results["fused"][1].spectral_layers]
kernel_calls = sum(s.kernel_calls for s in fused_layers)
check("fused kernel served every decode step", kernel_calls == 2 * 59 and all(s.fallback_calls == 0 for s in fused_layers),
      f"kernel_calls={kernel_calls}")
a, b = results["spectral"][0], results["fused"][0]
same = (a.sequences == b.sequences).float().mean().item()
# Random tiny models have near-flat logits: bf16 rounding may flip a late argmax.
check("bf16 fused tokens agree with spectral", same >= 0.9, f"agreement={same:.3f}")
rel = max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(a.scores, b.scores))
check("bf16 fused logits close to spectral", rel < 2e-2, f"max rel err={rel:.2e}")
print(f"memory ratio (fp16-equivalent dense / held) after 210 tokens: {results['fused'][1].memory_report()['ratio']:.2f}x")
finish()
