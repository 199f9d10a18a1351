"""Input checks of the tier manager: what an update must look like before anything is stored."""

from __future__ import annotations

import torch

from .config import SpectralConfig

__all__ = ["check_update", "check_finite", "crop_length", "DeferredFinite", "DEFER_FINITE_ON", "FINITE_CHECK_EVERY",
           "defers_finite"]

# Device types on which a decode update's finiteness is checked on the device and read later
# (`DeferredFinite`): reading it at once is a host sync per layer per step, which serializes the
# host's Python with the GPU's work (on the H200, eager `generate` steps measured ~57 ms + the
# GPU time instead of the larger of the two). On the CPU the read costs nothing: checked at once.
DEFER_FINITE_ON = frozenset({"cuda"})
# Deferred flags are read every this many updates of a layer (and before a compression, a save,
# a crop): one sync per layer per 16 steps.
FINITE_CHECK_EVERY = 16


def check_update(name: str, config: SpectralConfig, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                 held: torch.Tensor | None, finite: bool = True) -> None:
    """Raise ValueError unless ``k``, ``v`` [B, H, T, D] (and ``valid`` bool [B, T]) fit a layer
    whose exact buffer is ``held`` [B, H, W, D] (None: nothing stored yet), values finite
    (``finite=False``: the caller checks finiteness itself, `DeferredFinite`)."""
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
    if finite:
        check_finite(name, k, v, valid)


def defers_finite(device: torch.device) -> bool:
    """Whether updates on ``device`` take the deferred NaN/Inf check (`DEFER_FINITE_ON`)."""
    return device.type in DEFER_FINITE_ON


def finite_flag(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """0-d bool on the tensors' device: every element of ``k`` and ``v`` is finite (no host sync)."""
    return torch.isfinite(torch.stack((*torch.aminmax(k), *torch.aminmax(v)))).all()


class DeferredFinite:
    """The finiteness of a layer's decode updates, checked on the device and read on the host
    only every `FINITE_CHECK_EVERY` updates or when `resolve` is called (before a compression,
    a save, a crop). A bad update is then reported by position; unlike the immediate check,
    its tokens are already in the exact tier (never in a cold block: compression reads the
    flag first, and checks its blocks again)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clear()

    def clear(self) -> None:
        self.ok: torch.Tensor | None = None
        self.since: int | None = None
        self.updates = 0

    def add(self, k: torch.Tensor, v: torch.Tensor, position: int) -> None:
        """Record the update ``k``, ``v`` [B, H, T, D] at positions ``position ..``."""
        flag = finite_flag(k, v)
        self.ok = flag if self.ok is None else self.ok & flag
        self.since = position if self.since is None else self.since
        self.updates += 1
        if self.updates >= FINITE_CHECK_EVERY:
            self.resolve(position + k.shape[2])

    def resolve(self, upto: int) -> None:
        """Read the flag (one host sync); raise ValueError if an update since the last read
        held NaN/Inf. ``upto``: the position after the newest recorded token."""
        if self.ok is None:
            return
        ok, since, device = self.ok, self.since, self.ok.device
        self.clear()
        if not bool(ok):
            raise ValueError(
                f"{self.name}: keys/values of a decode update at positions {since}..{upto - 1} hold NaN/Inf "
                f"(the model produced non-finite attention inputs). On {device.type} this check runs on the device "
                f"and is read every {FINITE_CHECK_EVERY} updates, so those tokens are already in the cache's exact "
                f"tier: crop the cache to {since} tokens or reset it"
            )


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
