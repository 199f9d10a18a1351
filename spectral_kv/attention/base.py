"""The `AttentionStrategy` plug point: one joint softmax over cold blocks and exact tokens."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..compressors.base import Compressor
from ..config import SpectralConfig
from ..registry import ATTENTION_STRATEGIES
from ..view import AttendView

__all__ = [
    "AttentionStrategy",
    "ATTENTION_STRATEGIES",
    "register_attention",
    "reference_attention",
    "expand_cold_mask",
]


def register_attention(name: str):
    """Class decorator: make an `AttentionStrategy` selectable as ``SpectralConfig(attention=name)``."""
    return ATTENTION_STRATEGIES.register(name)


class AttentionStrategy(ABC):
    """Attends a query over one layer's cold blocks and exact tokens (`AttendView`).

    A strategy implements one method, `attend`, and declares which compressors it serves
    (`serves`; `SpectralConfig` asks it, so a config it cannot serve fails at construction).

    Parameters
    ----------
    config : SpectralConfig
    key_compressor, value_compressor : Compressor
        The compressors that produced the cold parts (they know how to read them).
    """

    name: ClassVar[str]
    # What `serves` requires, for error messages ("attention='x' needs ... compressors").
    needs: ClassVar[str] = "any"

    def __init__(self, config: SpectralConfig, key_compressor: Compressor, value_compressor: Compressor) -> None:
        self.config = config
        self.key_compressor = key_compressor
        self.value_compressor = value_compressor

    @classmethod
    def serves(cls, key_compressor: type[Compressor], value_compressor: type[Compressor]) -> bool:
        """Whether this strategy can attend over blocks of these compressor classes (default: any)."""
        return True

    @abstractmethod
    def attend(self, q: torch.Tensor, view: AttendView, scaling: float) -> torch.Tensor:
        """Softmax attention over all valid cold and exact keys of ``view``.

        Parameters
        ----------
        q : Tensor [B, Hq, Tq, D]
            Queries; ``Hq = H * G``, query head ``i`` reads KV head ``i // G``.
        view : AttendView
            Exact tokens ``[B, H, W, D]`` (the staged new tokens included), cold parts
            ``[B, H, NB, ...]`` and per-row shared state, with validity as masks (dynamic
            storage) or device counts (static storage; `AttendView.masks` / `counts`
            convert). Every query sees every valid cold token (cold tokens are older).
        scaling : float
            Softmax scale.

        Returns
        -------
        Tensor [B, Hq, Tq, D] in ``q.dtype``; queries that may attend nothing get zeros.
        """


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
