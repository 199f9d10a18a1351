"""Next-token selection for `spectral_kv.graphs.StaticDecoder`: greedy, or sampling with
temperature, top-k and top-p applied as transformers' logits warpers apply them (same order,
same float32 math, one ``torch.multinomial`` draw per step), so a seeded CPU run draws the same
tokens as ``generate(do_sample=True, ...)``. Only tensor ops with fixed shapes: the whole
selection is captured inside the decode step's CUDA graph (PyTorch advances the CUDA
generator's offset at every replay)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen.

    Parameters
    ----------
    do_sample : bool
        False: greedy (argmax); the other fields are then ignored.
    temperature : float
        Logits are divided by it (> 0).
    top_k : int
        Keep the ``top_k`` most likely tokens (0: all).
    top_p : float
        Keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1: all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] -> token ids [B, 1]."""
        if not self.do_sample:
            return logits.argmax(-1, keepdim=True)
        scores = logits.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            drop[..., -1:] = False  # keep at least one token
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1)
