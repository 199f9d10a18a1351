"""spectral_kv: a low-rank (spectral) compressed KV cache for transformer inference.

``import spectral_kv`` registers the "spectral_kv" attention and mask functions with
transformers.
"""

from .attention import ATTENTION_STRATEGIES, AttentionStrategy, register_attention
from .compressors import COMPRESSORS, Compressor, LowRankCompressor, register_compressor
from .config import SpectralConfig
from .integrations.transformers import ATTENTION_NAME, SpectralCache, SpectralPatch, patch_model
from .graphs import StaticDecoder
from .integrations.unsloth import patch_unsloth_attention
from .tiers import TierManager
from .view import AttendView

from ._version import __version__  # noqa: F401  (re-exported)

__all__ = [
    "SpectralConfig",
    "SpectralCache",
    "SpectralPatch",
    "patch_unsloth_attention",
    "patch_model",
    "ATTENTION_NAME",
    "TierManager",
    "AttendView",
    "StaticDecoder",
    "Compressor",
    "LowRankCompressor",
    "AttentionStrategy",
    "COMPRESSORS",
    "ATTENTION_STRATEGIES",
    "register_compressor",
    "register_attention",
]
