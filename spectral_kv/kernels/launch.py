"""Small helpers every Triton op wrapper of this package shares (no triton import needed)."""

from __future__ import annotations

import torch

__all__ = ["pow2", "num_sms", "is_fake", "nonempty", "strides"]


def pow2(x: int, lo: int) -> int:
    """The smallest power of two >= ``x`` and >= ``lo`` (Triton block sizes)."""
    return max(lo, 1 << max(0, (int(x) - 1).bit_length()))


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere: the interpreter's grids stay small)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def is_fake(t: torch.Tensor) -> bool:
    """A meta or fake tensor (torch.compile tracing, opcheck): shapes only, no storage."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return t.device.type == "meta" or _is_fake(t)


def nonempty(t: torch.Tensor) -> torch.Tensor:
    # Triton cannot take a null pointer; a zero-size pool (NB = 0) is never dereferenced.
    return t if t.numel() > 0 else torch.zeros(1, dtype=t.dtype, device=t.device)


def strides(t: torch.Tensor, ndim: int) -> list[int]:
    """``t``'s strides, zeros for an empty tensor (never dereferenced)."""
    return list(t.stride()) if t.numel() > 0 else [0] * ndim
