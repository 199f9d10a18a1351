"""Per-layer attention fidelity of a cache against the exact one.

Exact queries (captured from the exact run at the first continuation positions) attend
over the *context* keys/values as each cache holds them right after the prefill, so the
probe isolates the cache's approximation from error that propagates through layers.
"""

from __future__ import annotations

import torch

from .. import metrics as M

__all__ = ["attention_probe", "layer_fidelity", "summarize_layers"]


def _expand_heads(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """``[H_kv, T, D]`` -> ``[H_q, T, D]`` (grouped-query attention)."""
    return x.repeat_interleave(n_q_heads // x.shape[0], dim=0)


def attention_probe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and outputs of softmax attention without a mask.

    Parameters
    ----------
    q : Tensor[Hq, Nq, D]
    k, v : Tensor[Hkv, T, D]

    Returns
    -------
    scores : Tensor[Hq, Nq, T]  (``q k^T / sqrt(D)``)
    out : Tensor[Hq, Nq, D]
    """
    hq, _, d = q.shape
    k, v = _expand_heads(k.float(), hq), _expand_heads(v.float(), hq)
    scores = q.float() @ k.transpose(-1, -2) / d**0.5
    return scores, torch.softmax(scores, -1) @ v


def layer_fidelity(
    q: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int = 16
) -> dict[str, float]:
    """Fidelity metrics of one layer.

    Parameters
    ----------
    q : Tensor[Hq, Nq, D]
    k_ref, v_ref, k, v : Tensor[Hkv, T, D]
        Exact and method keys/values over the same ``T`` context positions.
    top_k : int

    Returns
    -------
    dict
        ``score_corr`` (the original design's metric), ``output_rel_err``, ``kl``
        (``KL(exact || method)`` of the attention distributions, nats) and ``topk_recall``.
    """
    if k.shape != k_ref.shape:
        raise ValueError(f"method keys {tuple(k.shape)} do not cover the reference positions {tuple(k_ref.shape)}")
    s_ref, o_ref = attention_probe(q, k_ref, v_ref)
    s, o = attention_probe(q, k, v)
    return {
        "score_corr": M.score_correlation(s, s_ref),
        "output_rel_err": M.output_relative_error(o, o_ref),
        "kl": M.attention_kl(s, s_ref),
        "topk_recall": M.topk_recall(s, s_ref, top_k),
    }


def summarize_layers(per_layer: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over layers, plus the worst layer's output error."""
    keys = per_layer[0].keys()
    out = {f"mean_{k}": sum(d[k] for d in per_layer) / len(per_layer) for k in keys}
    out["max_output_rel_err"] = max(d["output_rel_err"] for d in per_layer)
    out["min_score_corr"] = min(d["score_corr"] for d in per_layer)
    return out
