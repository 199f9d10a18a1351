"""`spectral-kv demo`: one retrieval question, answered with the exact cache and the spectral cache.

The prompt is the eval harness's needle-in-a-haystack format (`spectral_kv.eval.niah`: a
5-digit secret at a depth of Python stdlib documentation, the question, the assistant turn
primed with "The secret number is"), which the embedded SmolLM2-135M-Instruct answers
correctly with the exact cache (9/9 in `results/niah-presets.json`). Prints both answers, the
spectral cache's bytes per tier against the exact cache, and decode speed against
`DynamicCache` (measured; meaningful on CUDA, where the fused kernels and graphs run).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["run_demo", "SECRET"]

SECRET = "48213"


def _answer(tok, tokens) -> str:
    return tok.decode(tokens, skip_special_tokens=True).strip()


def run_demo(args) -> int:
    from transformers import DynamicCache

    from . import SpectralConfig, patch_unsloth_attention
    from .bench import timed_generate
    from .eval.niah import build_prompt
    from .models import ModelPackageMissing, load_model, quiet_transformers
    from .text import stdlib_tokens

    torch.manual_seed(0)
    name = getattr(args, "model", None) or "smollm2"
    device = getattr(args, "device", None) or "cpu"
    print(f"spectral_kv demo: {'SmolLM2-135M-Instruct (embedded GGUF)' if name == 'smollm2' else name} on {device}")
    try:
        model, tok = load_model(name, gguf=getattr(args, "gguf", None), dtype=getattr(args, "dtype", None),
                                device=device, progress=True)
    except ModelPackageMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    haystack = stdlib_tokens(tok, args.context + 200, offset=args.offset)
    ids = torch.tensor([build_prompt(tok, haystack, args.context, args.depth, SECRET)], device=model.device)
    print(f"prompt: {ids.shape[1]} tokens of Python stdlib documentation; secret number {SECRET} placed at "
          f"{args.depth:.0%} of it; question: what is the secret number?")
    config = SpectralConfig.preset(args.preset, verbose=False)
    n = args.max_new_tokens
    with quiet_transformers():  # generation-flag notices
        exact, t_exact, ms_exact = timed_generate(model, ids, n, "exact cache", exact_length=False, past_key_values=(cache := DynamicCache()))
        exact_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        patch = patch_unsloth_attention(model, config=config, verbose=False)
        try:
            spectral, t_spec, ms_spec = timed_generate(model, ids, n, "spectral cache", exact_length=False)
            report = patch.memory_report()
        finally:
            patch.unpatch()
    a_exact, a_spec = _answer(tok, exact[0]), _answer(tok, spectral[0])
    print()
    print(f"exact cache    answers: {a_exact!r:<28} correct: {SECRET in a_exact}")
    print(f"spectral cache answers: {a_spec!r:<28} correct: {SECRET in a_spec}   (preset {args.preset})")
    mb = 2**20
    layers = len(report["per_layer"])
    dtype = str(model.dtype).replace("torch.", "")
    print()
    print(f"KV cache held after the answer ({report['tokens'] // max(1, layers)} tokens x {layers} layers, {dtype}):")
    print(f"  {'tier':<22}{'MB':>9}")
    rows = [("cold keys (compressed)", "cold_keys"), ("cold values (compr.)", "cold_values"), ("sinks (exact)", "sinks"),
            ("warm (exact)", "warm"), ("hot (exact)", "hot"), ("padding", "padding")]
    for label, key in rows:
        if key != "padding" or report.get(key):
            print(f"  {label:<22}{report[key] / mb:>9.2f}")
    print(f"  {'spectral cache total':<22}{report['total_bytes'] / mb:>9.2f}")
    print(f"  {'exact DynamicCache':<22}{exact_bytes / mb:>9.2f}   ratio {exact_bytes / report['total_bytes']:.2f}x")
    print()
    if model.device.type == "cuda":
        print(f"decode speed (CUDA): DynamicCache {ms_exact:.2f} ms/token, spectral {ms_spec:.2f} ms/token "
              f"({ms_exact / ms_spec:.2f}x; `spectral-kv bench` adds the static + compile baseline and StaticDecoder)")
    else:
        print(f"decode ms/token on this CPU: DynamicCache {ms_exact:.0f}, spectral {ms_spec:.0f} (torch reference "
              f"strategies on shared cores, not a speed claim; speed is measured on CUDA: `spectral-kv bench --device cuda`)")
    return 0 if SECRET in a_exact and SECRET in a_spec else 1
