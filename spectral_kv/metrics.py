"""Pure metric functions for comparing a compressed KV cache against the exact one.

Every function takes plain tensors and returns Python floats (or small tensors), so it
can be checked against hand-computed cases.  Shapes follow the conventions

* ``logits``: ``[T, V]`` (one row per predicted position, vocabulary ``V``),
* ``targets``: ``[T]`` token ids,
* ``scores``: ``[..., S]`` pre-softmax attention scores over ``S`` keys,
* ``outputs``: ``[..., D]`` attention outputs.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "mean_nll",
    "perplexity",
    "ppl_delta",
    "top1_agreement",
    "score_correlation",
    "output_relative_error",
    "attention_kl",
    "topk_recall",
    "mean_and_spread",
]


def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats/token) of ``targets`` under ``logits``.

    Parameters
    ----------
    logits : Tensor[T, V]
    targets : Tensor[T] (int64)
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-logp.gather(-1, targets.long().unsqueeze(-1)).mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp(mean_nll)`` of ``targets`` under ``logits`` (Tensor[T, V], Tensor[T])."""
    return math.exp(mean_nll(logits, targets))


def ppl_delta(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Perplexity of a method against the exact reference on the same targets.

    Parameters
    ----------
    logits, ref_logits : Tensor[T, V]
        Method and exact-cache logits for the same ``T`` positions.
    targets : Tensor[T]

    Returns
    -------
    dict
        ``ppl``, ``ppl_ref``, ``delta`` (absolute, ``ppl - ppl_ref``) and
        ``rel`` (``delta / ppl_ref``).
    """
    p, r = perplexity(logits, targets), perplexity(ref_logits, targets)
    return {"ppl": p, "ppl_ref": r, "delta": p - r, "rel": (p - r) / r}


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax token equals the reference argmax.

    Parameters
    ----------
    logits, ref_logits : Tensor[T, V]
    """
    return float((logits.argmax(-1) == ref_logits.argmax(-1)).double().mean())


def score_correlation(scores: torch.Tensor, ref_scores: torch.Tensor) -> float:
    """Mean Pearson correlation between score rows (the original design's metric).

    Parameters
    ----------
    scores, ref_scores : Tensor[..., S]
        Pre-softmax attention scores; the correlation is taken over the last axis
        for every row and averaged.  A constant row correlates as 1 with itself.
    """
    a = scores.double() - scores.double().mean(-1, keepdim=True)
    b = ref_scores.double() - ref_scores.double().mean(-1, keepdim=True)
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    corr = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num))
    return float(corr.mean())


def output_relative_error(outputs: torch.Tensor, ref_outputs: torch.Tensor) -> float:
    """Mean over rows of ``||out - ref|| / ||ref||`` (Tensor[..., D] each)."""
    diff = (outputs.double() - ref_outputs.double()).norm(dim=-1)
    return float((diff / ref_outputs.double().norm(dim=-1).clamp_min(1e-30)).mean())


def attention_kl(scores: torch.Tensor, ref_scores: torch.Tensor) -> float:
    """Mean ``KL(softmax(ref) || softmax(scores))`` in nats over rows (Tensor[..., S])."""
    logp_ref = torch.log_softmax(ref_scores.double(), -1)
    logp = torch.log_softmax(scores.double(), -1)
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())


def topk_recall(scores: torch.Tensor, ref_scores: torch.Tensor, k: int) -> float:
    """Fraction of the reference top-``k`` keys that are also in the method's top-``k``.

    Parameters
    ----------
    scores, ref_scores : Tensor[..., S]
    k : int
        Clipped to ``S``.
    """
    k = min(k, scores.shape[-1])
    ref_idx = ref_scores.topk(k, dim=-1).indices
    idx = scores.topk(k, dim=-1).indices
    hit = (ref_idx.unsqueeze(-1) == idx.unsqueeze(-2)).any(-1)
    return float(hit.double().mean())


def mean_and_spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of ``values``."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max()), "n": len(values)}
