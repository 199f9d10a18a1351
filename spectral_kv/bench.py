"""`spectral-kv bench`: decode speed and memory of `DynamicCache`, transformers' static cache
with its automatic compile (CUDA), and each preset (`SpectralCache` generate; `StaticDecoder`
on CUDA), all measured in one run so the ratios compare like with like.

Timing: every generated token passes through a stopping criterion that records a timestamp
(after a CUDA synchronize on GPUs), so decode ms/token is the median gap between consecutive
tokens: the prefill is excluded without running it twice. `StaticDecoder` records its steps
with CUDA events (`record_step_times`). Memory: bytes the cache holds after generation, from
its tensors (`SpectralCache.memory_report`; the keys/values of the others).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import torch

__all__ = ["timed_generate", "cache_nbytes", "run_bench", "format_rows"]


def timed_generate(model, ids, max_new_tokens: int, desc: str = "", progress: bool = True, exact_length: bool = True,
                   **kwargs):
    """Greedy ``model.generate`` of ``max_new_tokens`` tokens (exactly, EOS suppressed, with
    ``exact_length``; else it may stop at EOS) with one tqdm bar.

    Returns ``(new_tokens [B, n], seconds_total, decode_ms_per_token)``; the last is the
    median gap between consecutive tokens (None for a single token).
    """
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria

    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False, disable=not progress)
    stamps: list[float] = []
    cuda = ids.device.type == "cuda"

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            if cuda:
                torch.cuda.synchronize(input_ids.device)
            stamps.append(time.perf_counter())
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if exact_length else None,
            do_sample=False, stopping_criteria=[Clock()], **kwargs,
        )
    seconds = time.perf_counter() - start
    bar.close()
    gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return out[:, ids.shape[1] :], seconds, (statistics.median(gaps) if gaps else None)


def cache_nbytes(cache) -> int:
    """Bytes held by a cache's tensors (distinct storages counted once)."""
    if hasattr(cache, "memory_report"):
        return int(cache.memory_report()["total_bytes"])
    from .eval.bytes import cache_tensors, count_bytes

    return sum(count_bytes(cache_tensors(layer))["held_bytes"] for layer in cache.layers)


def _row(name, ms, nbytes, tokens, note=""):
    return {"method": name, "decode_ms_per_token": ms, "cache_bytes": nbytes, "positions": tokens, "note": note}


def run_bench(model, presets: list[str], batch: int, context: int, new_tokens: int, out: str, tag: str,
              model_name: str, progress: bool = True, log=print) -> dict[str, Any]:
    """Measure every method; write ``out/tag.json`` and ``out/tag.png``; returns the results."""
    from transformers import DynamicCache

    from . import SpectralCache, SpectralConfig, patch_unsloth_attention
    from .models import check_servable

    if new_tokens < 2:
        raise ValueError(f"--new-tokens {new_tokens}: need at least 2 to time a decode step")
    device = next(model.parameters()).device
    configs = {p: SpectralConfig.preset(p, verbose=False) for p in presets}
    for p, cfg in configs.items():
        check_servable(model, cfg)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    g = torch.Generator().manual_seed(0)
    # Random ids: speed does not depend on the text, and this needs no tokenizer or corpus.
    ids = torch.randint(3, vocab, (batch, context), generator=g).to(device)
    rows = []
    cache = DynamicCache()
    _, _, ms = timed_generate(model, ids, new_tokens, "DynamicCache", progress, past_key_values=cache)
    rows.append(_row("DynamicCache generate", ms, cache_nbytes(cache), context + new_tokens - 1))
    notes = []
    if device.type == "cuda":
        kwargs = dict(cache_implementation="static")
        timed_generate(model, ids, min(new_tokens, 8), "static warm-up (compile)", progress, **kwargs)
        _, _, ms = timed_generate(model, ids, new_tokens, "static + compile", progress, **kwargs)
        nbytes = 2 * batch * (context + new_tokens) * _kv_row_bytes(model)
        rows.append(_row("static cache + compile generate", ms, nbytes, context + new_tokens - 1,
                         "transformers' StaticCache, automatic torch.compile; bytes = its preallocated buffers"))
    else:
        notes.append("CPU run: transformers' static cache + compile baseline and StaticDecoder (CUDA graphs) "
                     "are CUDA-only and were not measured")
    for p, cfg in configs.items():
        patch = patch_unsloth_attention(model, config=cfg, verbose=False)
        try:
            _, _, ms = timed_generate(model, ids, new_tokens, f"{p} generate", progress)
            rows.append(_row(f"{p}: SpectralCache generate", ms, cache_nbytes(patch.last_cache), context + new_tokens - 1))
            if device.type == "cuda":
                from .graphs import StaticDecoder

                cache = SpectralCache(cfg, model.config)
                dec = StaticDecoder(model, cache, record_step_times=True)
                with torch.no_grad():
                    dec.generate(ids, max_new_tokens=new_tokens)
                rows.append(_row(f"{p}: StaticDecoder (CUDA graph)", statistics.median(dec.step_ms),
                                 cache_nbytes(cache), context + new_tokens - 1))
        finally:
            patch.unpatch()
    base = rows[0]
    for r in rows:
        r["speedup_vs_dynamic"] = base["decode_ms_per_token"] / r["decode_ms_per_token"] if r["decode_ms_per_token"] else None
        r["memory_ratio_vs_dynamic"] = base["cache_bytes"] / r["cache_bytes"] if r["cache_bytes"] else None
    result = {
        "tag": tag, "model": model_name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch": batch, "context": context, "new_tokens": new_tokens, "presets": presets,
        "threads": torch.get_num_threads(), "rows": rows, "notes": notes,
        "timing": "decode ms/token = median gap between consecutive generated tokens (prefill excluded); "
                  "ratios vs DynamicCache measured in this run",
    }
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, tag)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    result["files"] = [stem + ".json"] + ([stem + ".png"] if _plot(result, stem + ".png") else [])
    return result


def _kv_row_bytes(model) -> int:
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def format_rows(result: dict[str, Any]) -> str:
    lines = [f"{'method':<40}{'ms/token':>10}{'speedup':>9}{'cache MB':>10}{'mem ratio':>10}"]
    for r in result["rows"]:
        ms = r["decode_ms_per_token"]
        lines.append(
            f"{r['method']:<40}{ms:>10.2f}{r['speedup_vs_dynamic']:>8.2f}x{r['cache_bytes'] / 2**20:>10.2f}"
            f"{r['memory_ratio_vs_dynamic']:>9.2f}x"
        )
    return "\n".join(lines + result["notes"])


def _plot(result: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2))
    axes[0].barh(names, [r["decode_ms_per_token"] for r in rows])
    axes[0].set_xlabel("decode ms / token (lower is better)")
    axes[1].barh(names, [r["cache_bytes"] / 2**20 for r in rows])
    axes[1].set_xlabel("cache MB after generation")
    axes[1].set_yticklabels([])
    for ax in axes:
        ax.invert_yaxis()
    fig.suptitle(f"{result['model']} on {result['device_name']}: batch {result['batch']}, context {result['context']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
