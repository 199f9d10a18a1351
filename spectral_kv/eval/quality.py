"""Perplexity delta, top-1 agreement, attention fidelity and bytes over several segments."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .. import metrics as M
from .capture import capture_queries
from .fidelity import layer_fidelity, summarize_layers
from .methods import CacheMethod
from .perplexity import run_segment

__all__ = ["segment_slices", "run_quality"]


def segment_slices(n_corpus: int, n_segments: int, length: int, start: int = 0) -> list[int]:
    """Start offsets of ``n_segments`` non-overlapping windows of ``length`` tokens.

    Windows are spread evenly over ``[start, n_corpus)`` so the segments read different
    documents.
    """
    room = n_corpus - start - length
    if room < 0 or n_segments * length > n_corpus - start:
        raise ValueError(f"corpus of {n_corpus} tokens cannot hold {n_segments} segments of {length}")
    if n_segments == 1:
        return [start]
    stride = room // (n_segments - 1)
    return [start + i * stride for i in range(n_segments)]


def _layer_dense(cache, method: CacheMethod, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    return [method.dense_kv(cache, i) for i in range(n_layers)]


def run_quality(
    model,
    methods: list[CacheMethod],
    corpus_ids: torch.Tensor,
    n_segments: int,
    context_len: int,
    continuation_len: int,
    chunk: int,
    fidelity_queries: int = 32,
    top_k: int = 16,
    log: Callable[[str], None] = print,
    offsets: list[int] | None = None,
) -> dict[str, Any]:
    """Run every method on every segment against the exact cache.

    Parameters
    ----------
    model : causal LM
    methods : list of CacheMethod (an ``exact`` one is run as the reference regardless)
    corpus_ids : Tensor[N] int64
    n_segments, context_len, continuation_len, chunk : int
    fidelity_queries : int
        Continuation positions whose exact queries probe attention fidelity (``<= chunk``).
    top_k : int
    offsets : list of int, optional
        Segment start offsets (default: spread evenly over ``corpus_ids``).

    Returns
    -------
    dict
        ``segments`` (offsets) and ``methods``: spec -> {``per_segment``: [...], ``summary``}.
    """
    from .methods import make_method, model_kv_shape

    n_layers, _, _ = model_kv_shape(model)
    length = context_len + continuation_len
    if offsets is None:
        offsets = segment_slices(corpus_ids.numel(), n_segments, length)
    nq = min(fidelity_queries, chunk, continuation_len - 1)
    results: dict[str, Any] = {m.spec: {"method": m.describe(), "per_segment": []} for m in methods}
    exact = make_method("exact")
    for si, off in enumerate(offsets):
        ctx = corpus_ids[off : off + context_len]
        cont = corpus_ids[off + context_len : off + length]
        ref_kv: list = []
        with capture_queries(model, nq, context_len) as queries:
            ref = run_segment(model, exact, ctx, cont, chunk, on_prefill=lambda c: ref_kv.extend(_layer_dense(c, exact, n_layers)))
        ref_kv = [(k[0].clone(), v[0].clone()) for k, v in ref_kv]
        qs = {i: q[0] for i, q in queries.items()}
        log(f"segment {si + 1}/{n_segments} @ {off}: exact ppl {M.perplexity(ref.logits, cont):.3f} ({ref.seconds:.0f}s)")
        for method in methods:
            t0 = time.perf_counter()
            fid: list[dict[str, float]] = []

            def probe(cache, method=method, fid=fid):
                if len(qs) != n_layers:
                    return
                for i in range(n_layers):
                    kv = method.dense_kv(cache, i)
                    if kv is None:
                        return
                    fid.append(layer_fidelity(qs[i], *ref_kv[i], kv[0][0], kv[1][0], top_k))

            if method.family == "exact":
                run, run_note = ref, "reference run"
                probe_cache_kv = ref_kv
                fid.extend(layer_fidelity(qs[i], *probe_cache_kv[i], *probe_cache_kv[i], top_k) for i in range(n_layers) if i in qs)
            else:
                method.setup(model)
                try:
                    run = run_segment(model, method, ctx, cont, chunk, on_prefill=probe)
                finally:
                    method.teardown(model)
                run_note = ""
            d = M.ppl_delta(run.logits, ref.logits, cont)
            row = {
                "offset": off,
                **d,
                "top1_agreement": M.top1_agreement(run.logits, ref.logits),
                "next_token_kl": M.attention_kl(run.logits, ref.logits),
                "bytes_after_prefill": run.bytes_after_prefill,
                "bytes_end": run.bytes_end,
                "fidelity_per_layer": fid or None,
                "fidelity": summarize_layers(fid) if fid else None,
                "decode_chunk": chunk,
                "seconds": run.seconds,
                **run.extra,
            }
            if run_note:
                row["note"] = run_note
            results[method.spec]["per_segment"].append(row)
            log(
                f"  {method.spec:24s} ppl {d['ppl']:.3f} (d {d['delta']:+.3f}) top1 {row['top1_agreement']:.3f} "
                f"ratio {run.bytes_after_prefill['ratio_vs_fp16']:.2f}x  {time.perf_counter() - t0:.0f}s"
            )
    for spec, r in results.items():
        segs = r["per_segment"]
        summary = {
            key: M.mean_and_spread([s[key] for s in segs])
            for key in ("delta", "rel", "ppl", "ppl_ref", "top1_agreement", "next_token_kl")
        }
        summary["ratio_vs_fp16_after_prefill"] = M.mean_and_spread([s["bytes_after_prefill"]["ratio_vs_fp16"] for s in segs])
        summary["ratio_vs_fp16_end"] = M.mean_and_spread([s["bytes_end"]["ratio_vs_fp16"] for s in segs])
        summary["bytes_per_token_layer_end"] = M.mean_and_spread([s["bytes_end"]["bytes_per_token_layer"] for s in segs])
        if all(s["fidelity"] for s in segs):
            for key in segs[0]["fidelity"]:
                summary[f"fidelity_{key}"] = M.mean_and_spread([s["fidelity"][key] for s in segs])
        r["summary"] = summary
    return {"segment_offsets": offsets, "methods": results}
