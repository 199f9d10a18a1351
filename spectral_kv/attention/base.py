"""The `AttentionStrategy` plug point: one joint softmax over cold blocks and exact tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..compressors import Compressor
from ..config import SpectralConfig
from ..registry import Registry

__all__ = [
    "AttentionStrategy",
    "ATTENTION_STRATEGIES",
    "register_attention",
    "reference_attention",
    "expand_cold_mask",
]

ATTENTION_STRATEGIES: Registry["AttentionStrategy"] = Registry("attention strategy")


def register_attention(name: str):
    """Class decorator: make an `AttentionStrategy` selectable as ``SpectralConfig(attention=name)``."""
    return ATTENTION_STRATEGIES.register(name)


class AttentionStrategy(ABC):
    """Attends a query over one layer's cold blocks and exact tokens.

    Parameters
    ----------
    config : SpectralConfig
    key_compressor, value_compressor : Compressor
        The compressors that produced the cold parts (they know how to read them).
    """

    name: ClassVar[str]

    def __init__(self, config: SpectralConfig, key_compressor: Compressor, value_compressor: Compressor) -> None:
        self.config = config
        self.key_compressor = key_compressor
        self.value_compressor = value_compressor

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        cold_k: dict[str, torch.Tensor],
        cold_v: dict[str, torch.Tensor],
        cold_valid: torch.Tensor | None,
        exact_k: torch.Tensor,
        exact_v: torch.Tensor,
        exact_mask: torch.Tensor | None,
        scaling: float,
    ) -> torch.Tensor:
        """Softmax attention over all valid cold and exact keys.

        Parameters
        ----------
        q : Tensor [B, Hq, Tq, D]
            Queries; ``Hq = H * G``, query head ``i`` reads KV head ``i // G``.
        cold_k, cold_v : dict of Tensor [B, H, NB, ...]
            Compressor parts of ``NB`` blocks of ``block_size`` tokens (may be empty).
        cold_valid : Tensor [B, NB] bool or None
            Which blocks of each row are real; None means all. Every query sees every valid
            cold token (cold tokens are older than any query).
        exact_k, exact_v : Tensor [B, H, Te, D]
        exact_mask : Tensor [B, 1, Tq, Te] bool or None
            True where query ``i`` may attend exact token ``j``; None means all.
        scaling : float
            Softmax scale.

        Returns
        -------
        Tensor [B, Hq, Tq, D] in ``q.dtype``; queries that may attend nothing get zeros.
        """


    def attend_counts(
        self,
        q: torch.Tensor,
        cold_k: dict[str, torch.Tensor],
        cold_v: dict[str, torch.Tensor],
        n_cold: torch.Tensor,
        exact_k: torch.Tensor,
        exact_v: torch.Tensor,
        n_exact: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """`attend` for static storage: validity given as per-row counts on the device.

        Row ``b`` holds its first ``n_cold[b]`` blocks and first ``n_exact[b]`` exact tokens
        (int ``[B]`` tensors), every one visible to every query. Builds the masks with tensor
        ops only (no host sync, fixed shapes), so the call can be captured in a CUDA graph.
        """
        b, _, tq, _ = q.shape
        width = exact_k.shape[2]
        exact_mask = (torch.arange(width, device=q.device)[None, :] < n_exact[:, None])[:, None, None, :]
        exact_mask = exact_mask.expand(b, 1, tq, width)
        cold_valid = None
        if cold_k:
            nb = next(iter(cold_k.values())).shape[2]
            cold_valid = torch.arange(nb, device=q.device)[None, :] < n_cold[:, None]
        return self.attend(q, cold_k, cold_v, cold_valid, exact_k, exact_v, exact_mask, scaling)


def expand_cold_mask(cold_valid: torch.Tensor | None, tq: int, block_size: int) -> torch.Tensor | None:
    """[B, NB] block validity -> [B, 1, Tq, NB * block_size] token mask (None stays None)."""
    if cold_valid is None:
        return None
    b, nb = cold_valid.shape
    return cold_valid[:, None, None, :, None].expand(b, 1, tq, nb, block_size).reshape(b, 1, tq, nb * block_size)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Plain softmax attention in float64 (the twin every strategy is tested against).

    q [B, Hq, Tq, D]; k, v [B, H, L, D]; mask [B, 1, Tq, L] bool or None.
    Returns float64 [B, Hq, Tq, D]; rows with nothing to attend are zeros.
    """
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    scores = (q.double() @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return p @ v
