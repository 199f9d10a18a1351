"""Hugging Face transformers integration: the only part of the library that imports transformers.

* `cache`: `SpectralCache` / `SpectralLayer` (the tiers behind transformers' `Cache` API);
* `attention`: the "spectral_kv" attention and mask functions and the update -> attention hand-off;
* `layer_access`: ``SpectralLayer.keys`` / ``.values`` read and assigned as on a `DynamicLayer`;
* `patching`: `patch_model` / `SpectralPatch`, and `check_generate_limits` (what a ``generate``
  call needs of the cache's configuration, checked before it runs);
* `persist`: save / load a cache (safetensors);
* `model_config`: what is read from a model config (`text_config`, `head_dim`).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

MIN_TRANSFORMERS = Version("5.2.0")
if Version(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(
        f"spectral_kv needs transformers>={MIN_TRANSFORMERS} (tested 5.2 to 5.17), found {transformers.__version__}"
    )

from .attention import ATTENTION_NAME, COUNTERS, spectral_attention_forward, spectral_mask  # noqa: E402
from .cache import CROP_ZERO_REMOVES_NOTHING, SpectralCache, SpectralLayer  # noqa: E402
from .patching import SpectralPatch, check_generate_limits, patch_model  # noqa: E402

__all__ = [
    "ATTENTION_NAME",
    "SpectralCache",
    "SpectralLayer",
    "SpectralPatch",
    "patch_model",
    "spectral_attention_forward",
    "spectral_mask",
    "COUNTERS",
    "CROP_ZERO_REMOVES_NOTHING",
    "MIN_TRANSFORMERS",
    "check_generate_limits",
]
