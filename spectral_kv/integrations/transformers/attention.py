"""The "spectral_kv" attention and mask functions, registered with transformers, and the hand-off.

transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function, which
receives the attention module but not the cache. ``SpectralLayer.update`` therefore *stages*
the new keys/values and leaves a hand-off (`hand_off`: this thread's layer + the exact key
tensor it returned); the attention function claims it only when handed that very tensor (an
identity check, so nothing else can be mistaken for it) and calls the layer's
``attend_and_commit``. Layers without a staged `SpectralLayer` (sliding-window layers, no
cache) run transformers' SDPA.

The registered mask function is transformers' ``sdpa_mask`` with the causal shortcut turned
off, so the attention function always gets a boolean ``[B, 1, Tq, kv_len]`` mask. Without a
registered mask function transformers silently passes *no* causal mask to a custom attention.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .layer_access import defer_if_hooked

__all__ = ["ATTENTION_NAME", "COUNTERS", "hand_off", "spectral_attention_forward", "spectral_mask"]

ATTENTION_NAME = "spectral_kv"
# Process-wide call counters: tests and `verbose` use them to prove attention really ran here.
COUNTERS = {"spectral_calls": 0, "exact_calls": 0, "mask_calls": 0}
_handoff = threading.local()


def hand_off(layer, key: torch.Tensor) -> None:
    """Leave ``layer`` (a staged `SpectralLayer`) for the attention call that receives ``key``."""
    _handoff.layer, _handoff.key = layer, key


def spectral_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "spectral_kv" attention implementation (transformers' AttentionInterface signature).

    Parameters are in ``sdpa_attention_forward``'s order (wrappers such as kvpress call it
    positionally). query [B, Hq, Tq, D], key/value [B, H, Tk, D] -> ([B, Tq, Hq, D], None).
    """
    layer = getattr(_handoff, "layer", None)
    if layer is not None and getattr(_handoff, "key", None) is key:
        _handoff.layer = _handoff.key = None
        if dropout:
            raise ValueError(f"spectral_kv attention is for inference; got dropout={dropout}")
        if not torch.compiler.is_compiling():  # a guarded count recompiles every step
            COUNTERS["spectral_calls"] += 1
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        defer_if_hooked(layer, module, query)  # a kvpress press in a forward hook reads the prompt exactly
        out = layer.attend_and_commit(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    if not torch.compiler.is_compiling():  # a guarded count recompiles every step
        COUNTERS["exact_calls"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def spectral_mask(*args, **kwargs):
    """transformers' SDPA mask, always materialized as bool ``[B, 1, Tq, kv_len]`` (never None)."""
    if not torch.compiler.is_compiling():  # a guarded count recompiles every step
        COUNTERS["mask_calls"] += 1
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, spectral_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, spectral_mask)
