"""Attention strategies: the registry and the built-in entries (importing registers them)."""

from .base import ATTENTION_STRATEGIES, AttentionStrategy, reference_attention, register_attention
from .reconstruct import ReconstructAttention
from .spectral import SpectralAttention
from .fused import FusedAttention  # noqa: E402  (registers "fused")

__all__ = [
    "ATTENTION_STRATEGIES",
    "AttentionStrategy",
    "register_attention",
    "reference_attention",
    "ReconstructAttention",
    "SpectralAttention",
    "FusedAttention",
]
