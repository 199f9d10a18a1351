"""Record the (post-RoPE) queries each attention layer sees, for the fidelity probe.

`capture_queries(model, n)` temporarily routes the model's attention through a wrapper of
transformers' sdpa that stores the first ``n`` query positions of the first call of each
layer made with more than ``min_len`` cached keys (i.e. the first decode chunk).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["CAPTURE_NAME", "capture_queries"]

CAPTURE_NAME = "spectral_kv_eval_capture"
_state: dict = {"active": False, "store": {}, "n": 0, "min_len": 0}


def _capture_forward(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _state["active"] and key.shape[-2] > _state["min_len"]:
        idx = getattr(module, "layer_idx", None)
        if idx is not None and idx not in _state["store"]:
            _state["store"][idx] = query[:, :, : _state["n"]].detach().float().clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_NAME, _capture_forward)
    try:  # masks: behave exactly like sdpa
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_NAME, sdpa_mask)
    except ImportError:  # pragma: no cover - older transformers
        pass


@contextlib.contextmanager
def capture_queries(model, n: int, min_len: int):
    """Capture queries ``[B, Hq, n, D]`` per layer index into the yielded dict.

    Parameters
    ----------
    model : transformers model using sdpa (the exact reference run)
    n : int
        Query positions kept from the first qualifying call of each layer.
    min_len : int
        Only calls whose key length exceeds this (the prefill length) are captured.
    """
    _register()
    store: dict[int, torch.Tensor] = {}
    previous = model.config._attn_implementation
    _set(model, CAPTURE_NAME)
    _state.update(active=True, store=store, n=n, min_len=min_len)
    try:
        yield store
    finally:
        _state.update(active=False, store={})
        _set(model, previous)


def _set(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
        except (ValueError, ImportError):
            pass
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name
