"""``SpectralLayer.keys`` / ``.values``: readable and assignable, as on transformers' `DynamicLayer`.

Clients written against `DynamicCache` (kvpress, user code) read and assign ``layer.keys`` /
``layer.values``. Reading gives the K/V attention sees (`TierManager.dense`); assigning is
interpreted as what it would mean for a `DynamicLayer`: the same contents (no-op), a prefix
(the newest tokens removed: `TierManager.truncate`, which attention cannot tell from the state
before), or new contents (`TierManager.replace`, before compression only). Clients assign one
role, then the other: a write whose shape differs from the other role's waits for it (the
layer's ``_pending``), and an update with a write still waiting is refused (`finish_writes`)
rather than silently mixing old and new contents.

`defer_if_hooked` is called by the attention function before a layer attends: a prompt attended
by a module with forward hooks (where kvpress presses read and rewrite keys/values) is
compressed at the layer's next update instead of now (`TierManager.defer_next_compression`).
"""

from __future__ import annotations

import torch

__all__ = ["read_role", "write_role", "finish_writes", "defer_if_hooked"]


def _pending(layer) -> dict:
    return layer.__dict__.setdefault("_pending", {})


def read_role(layer, role: str) -> torch.Tensor | None:
    """``role`` ("keys" / "values") ``[B, H, L, D]`` as attention sees it, ``None`` while empty.

    With cold blocks this is a full-precision copy (decompressed on each read), so it costs what
    a `DynamicCache` of the same length holds. A write of ``role`` still waiting for the other
    role reads back as written.
    """
    pending = layer.__dict__.get("_pending") or {}
    if role in pending:
        return pending[role]
    tiers = layer.__dict__.get("tiers")  # CacheLayerMixin.__init__ runs before the tiers exist
    if tiers is None or not tiers.initialized:
        return None
    return tiers.dense()[0 if role == "keys" else 1]


def write_role(layer, role: str, new: torch.Tensor | None) -> None:
    """Assign ``role`` = ``new`` ``[B, H, L', D]`` (or None, which only an empty layer takes)."""
    if new is None:  # CacheLayerMixin.__init__ assigns None; so may a client emptying a layer
        tiers = layer.__dict__.get("tiers")
        if tiers is not None and tiers.initialized and tiers.seen:
            raise ValueError(
                f"SpectralCache layer {layer.layer_idx}: assigning layer.{role} = None would drop "
                f"{tiers.seen} positions; use cache.reset() or crop()"
            )
        return
    if not isinstance(new, torch.Tensor) or new.dim() != 4:
        raise ValueError(
            f"SpectralCache layer {layer.layer_idx}: layer.{role} must be a [batch, kv_heads, tokens, head_dim] "
            f"tensor, got {type(new).__name__} {tuple(getattr(new, 'shape', ()))}"
        )
    pending = _pending(layer)
    pending[role] = new
    other = "values" if role == "keys" else "keys"
    if other not in pending:
        current = read_role(layer, other)
        if current is None or current.shape != new.shape:
            return  # wait for the other role
        pending[other] = current
    keys, values = pending.pop("keys"), pending.pop("values")
    _assign(layer, keys, values)


def _assign(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.shape != values.shape:
        raise ValueError(
            f"SpectralCache layer {layer.layer_idx}: assigned keys {tuple(keys.shape)} and values "
            f"{tuple(values.shape)} differ in shape"
        )
    if not layer.is_initialized:
        layer.lazy_initialization(keys, values)
    t = layer.tiers
    if t.initialized:
        cur_k, cur_v = t.dense()
        n = keys.shape[2]
        if keys.shape[:2] == cur_k.shape[:2] and n <= cur_k.shape[2] and keys.shape[3] == cur_k.shape[3]:
            if torch.equal(keys, cur_k[:, :, :n]) and torch.equal(values, cur_v[:, :, :n]):
                if n < cur_k.shape[2]:  # the newest tokens removed (kvpress, after an answer)
                    t.truncate(n, keys, values)
                return
    t.replace(keys.to(layer.dtype), values.to(layer.dtype))


def finish_writes(layer) -> None:
    """Called first in ``SpectralLayer.update``: a write of one role never matched by the other
    is a `ValueError`."""
    pending = layer.__dict__.get("_pending")
    if pending:
        role = next(iter(pending))
        raise ValueError(
            f"SpectralCache layer {layer.layer_idx}: layer.{role} was assigned {tuple(pending[role].shape)}, "
            f"which does not match the layer's other role; assign keys and values of the same shape"
        )


def defer_if_hooked(layer, module: torch.nn.Module, query: torch.Tensor) -> None:
    """Leave a prompt (``query`` [B, Hq, Tq > 1, D]) exact until the layer's next update when
    ``module`` carries forward hooks (where kvpress presses run)."""
    layer.tiers.defer_next_compression = query.shape[2] > 1 and bool(module._forward_hooks)
