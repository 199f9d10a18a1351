"""`patch_unsloth_attention`: the one-call entry point (plain transformers models and Unsloth)."""

from __future__ import annotations

from ..config import SpectralConfig
from .transformers import SpectralPatch, patch_model

__all__ = ["patch_unsloth_attention"]


def patch_unsloth_attention(
    model,
    block_size: int = 512,
    k_rank_keys: int = 16,
    k_rank_values: int = 32,
    hot_buffer_size: int = 64,
    use_spectral_attention: bool = True,
    verbose: bool = True,
    **more,
) -> SpectralPatch:
    """Make ``model.generate(...)`` use the spectral KV cache, with no other change.

    Parameters
    ----------
    model : transformers PreTrainedModel (or an Unsloth-loaded one)
    block_size, k_rank_keys, k_rank_values, hot_buffer_size, use_spectral_attention, verbose
        The original design's parameters (see `SpectralConfig`).
    **more
        Any other `SpectralConfig` field (``sink_tokens``, ``coeff_bits``, ``compressor``...),
        or ``config=SpectralConfig(...)`` to pass a whole config (the named arguments then
        override its fields only where they differ from their defaults).

    Returns
    -------
    SpectralPatch
        ``unpatch()`` restores the model; ``memory_report()`` reports the latest cache.
    """
    base = more.pop("config", None) or SpectralConfig()
    named = dict(
        block_size=block_size,
        k_rank_keys=k_rank_keys,
        k_rank_values=k_rank_values,
        hot_buffer_size=hot_buffer_size,
        use_spectral_attention=use_spectral_attention,
        verbose=verbose,
    )
    defaults = SpectralConfig()
    changes = {k: v for k, v in named.items() if v != getattr(defaults, k)}
    config = base.replace(**changes, **more)
    return patch_model(model, config, verbose=config.verbose)
