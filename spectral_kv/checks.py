"""Input checks of the tier manager: what an update must look like before anything is stored."""

from __future__ import annotations

import torch

from .config import SpectralConfig

__all__ = ["check_update", "check_finite", "crop_length"]


def check_update(name: str, config: SpectralConfig, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 held: torch.Tensor | None) -> None:
    """Raise ValueError unless ``k``, ``v`` [B, H, T, D] (and ``valid`` bool [B, T]) fit a layer
    whose exact buffer is ``held`` [B, H, W, D] (None: nothing stored yet), values finite."""
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"{name}: keys and values must both be [batch, kv_heads, tokens, head_dim], "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.dtype != v.dtype or not k.is_floating_point():
        raise ValueError(f"{name}: keys/values must share one float dtype, got {k.dtype} and {v.dtype}")
    if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(
            f"{name}: valid must be bool [batch, tokens]={k.shape[0], k.shape[2]}, "
            f"got {valid.dtype} {tuple(valid.shape)}"
        )
    if held is not None:
        b, h, _, d = held.shape
        if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
            raise ValueError(
                f"{name}: update shaped {tuple(k.shape)} does not match the cache's "
                f"batch={b}, kv_heads={h}, head_dim={d}"
            )
        if k.dtype != held.dtype or k.device != held.device:
            raise ValueError(
                f"{name}: update is {k.dtype} on {k.device}, the cache holds "
                f"{held.dtype} on {held.device}"
            )
    else:
        config.check_head_dim(k.shape[3])
    check_finite(name, k, v, valid)


def check_finite(name: str, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
    """NaN/Inf in a real (non-padding) position is refused before anything is stored."""
    if k.numel() == 0:
        return
    # Fast path: min/max reductions allocate no K-sized temporary (isfinite would) and
    # propagate NaN; one host sync for both tensors.
    if bool(torch.isfinite(torch.stack((*torch.aminmax(k), *torch.aminmax(v)))).all()):
        return
    finite = (torch.isfinite(k) & torch.isfinite(v)).all(dim=3).all(dim=1)  # [B, T]
    if valid is not None:
        finite = finite | ~valid.to(finite.device)
    if bool(finite.all()):
        return
    rows = (~finite).any(dim=1).nonzero().squeeze(1).tolist()
    which = [
        role
        for role, x in (("keys", k), ("values", v))
        if not bool(torch.isfinite(x).all())
    ]
    raise ValueError(
        f"{name}: {'/'.join(which)} of batch row(s) {rows} hold NaN/Inf; refusing to store them "
        f"(the model produced non-finite {'/'.join(which)})"
    )


def crop_length(max_length, name: str) -> int:
    """``crop``'s argument as an int (transformers 5.17's assisted decoding passes a 0-d tensor);
    a `TypeError` naming ``name`` for anything else."""
    if isinstance(max_length, torch.Tensor) and max_length.numel() == 1 and not max_length.is_floating_point():
        max_length = int(max_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"{name}: crop(max_length) needs an int, got {max_length!r}")
    return max_length
