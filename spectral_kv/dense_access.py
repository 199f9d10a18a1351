"""Dense access to one layer's tiers: what clients written against `DynamicCache` read and write.

kvpress presses (and user code) read a layer's ``keys`` / ``values`` ``[B, H, L, D]`` and assign
new ones: a press, in a forward hook right after the prefill's attention, writes back the tokens
it keeps; the pipeline, after each answer, assigns a prefix (the answer removed). `TierManager`
serves that through the three functions here (its `dense`, `replace` and `truncate` delegate to
them):

* `dense`: the keys/values as attention reads them (cold blocks decompressed);
* `replace`: new contents, allowed while nothing is compressed (compressed tokens cannot be
  re-chosen one by one);
* `truncate`: a prefix of `dense`, also into the cold blocks.

A press acts on the uncompressed prompt because the integration sets
``TierManager.defer_next_compression`` for a multi-token update whose attention module carries
forward hooks (where presses run): that update leaves its ready blocks exact and the layer's
next append (or `TierManager.settle`, or `TierManager.freeze`) compresses them. Without hooks
nothing is deferred, so peak memory during a long prefill stays one layer's prompt.

Per-row shared compressor state (``cold.shared_k`` / ``shared_v`` and ``cold.fitted``, see
`spectral_kv.blocks.ColdTier`) follows the blocks it encoded: `truncate` keeps it for the rows'
surviving blocks (the tokens held exactly again are recompressed with it) and drops it with the
last block; `replace` runs on a layer with no block, whose new contents are fitted at their
first compression.

Works on a `TierManager` passed in (duck-typed; this module imports nothing of the package).
"""

from __future__ import annotations

import torch

__all__ = ["dense", "replace", "truncate"]


def _check_unpadded(tm, what: str) -> None:
    tokens = tm.tokens()
    if any(n != tm.seen for n in tokens):
        raise ValueError(
            f"{tm.name}: rows hold {tokens} real tokens of {tm.seen} positions (a padded batch); {what} in "
            f"DynamicCache's [batch, heads, positions, head_dim] layout needs unpadded rows (read "
            f"tiers.materialize() instead)"
        )


def dense(tm) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's keys and values as attention reads them, ``[B, H, L, D]`` in the exact tiers' dtype.

    ``L`` = ``tm.seen`` (every row holds every position: no padding). With nothing compressed
    these are the exact buffers themselves (as `DynamicCache` returns its own tensors);
    otherwise a full-precision copy with the cold blocks decompressed, built on each call (it
    costs what a `DynamicCache` of the same length holds). A frozen layer thaws first (static
    storage keeps spare slots in its exact buffer). A padded batch has no such layout:
    `ValueError`.
    """
    if not tm.initialized:
        raise RuntimeError(f"{tm.name}: the cache is empty")
    _check_unpadded(tm, "keys/values")
    tm.thaw()
    keys, values, _ = tm.materialize()
    return keys, values


def replace(tm, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Install ``keys`` / ``values`` ``[B, H, L', D]`` as the layer's whole contents (``seen`` = ``L'``).

    What a kvpress press does after the prefill (``L'`` = the tokens it keeps). Allowed only
    while nothing is compressed: otherwise `NotImplementedError` naming the operation. The new
    tokens are compressed at the next append, so a second writer (kvpress' ComposedPress) also
    sees them exactly. Batch, heads and head_dim must match the cache: `ValueError`. With no
    block there is no fitted shared state to keep (a row's state is fitted at its first
    compression and dropped with its last block); the new contents are fitted when they are
    first compressed.
    """
    if any(tm.n_cold):
        raise NotImplementedError(
            f"{tm.name}: writing layer.keys/values (replacing the cache contents, as a kvpress press does) needs "
            f"an uncompressed layer, but rows hold {tm.n_cold} compressed block(s) of {tm.config.block_size} "
            f"tokens; presses compose under the 'spectral_kv' attention, which defers a prompt's compression "
            f"while its attention module has forward hooks"
        )
    if tm.initialized:
        b, h, _, d = tm.exact_k.shape
        if keys.dim() != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != (b, h, d):
            raise ValueError(
                f"{tm.name}: replacing keys shaped {tuple(keys.shape)}: the cache holds batch={b}, kv_heads={h}, "
                f"head_dim={d}"
            )
    tm.reset()
    tm.defer_next_compression = True
    tm.append(keys, values)


def truncate(tm, n: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Keep the first ``n`` positions, where ``keys`` / ``values`` ``[B, H, >= n, D]`` begin with
    `dense`'s first ``n`` positions (kvpress removing an answer assigns exactly that).

    A cut inside the exact tiers is ``tm.crop(n)``. A cut inside the cold blocks keeps the
    blocks wholly before it, drops the rest, and holds the surviving tokens of the cut block
    exactly, as the given (decompressed) values: attention then reads the same K/V it read
    before the cut. Those tokens are compressed again when their block fills (a second rounding
    of values already on the code grid), with the rows' shared state, which stays fitted while a
    block survives (`spectral_kv.blocks.ColdTier.narrow` drops it with the last one). Rows must
    be unpadded and hold equal numbers of blocks: `ValueError`, as for ``n`` outside
    ``[0, seen]`` or ``keys`` / ``values`` not covering ``n`` positions of the cache's shape.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= tm.seen:
        raise ValueError(f"{tm.name}: truncate(n) needs an int in [0, {tm.seen}], got {n!r}")
    if not tm.initialized:
        return
    tm.thaw()
    b, h, _, d = tm.exact_k.shape
    for role, t in (("keys", keys), ("values", values)):
        if t.dim() != 4 or tuple(t.shape[:2]) != (b, h) or t.shape[2] < n or t.shape[3] != d:
            raise ValueError(
                f"{tm.name}: truncate({n}) got {role} shaped {tuple(t.shape)}, expected [{b}, {h}, >= {n}, {d}]"
            )
    s, bs = tm.config.sink_tokens, tm.config.block_size
    blocks = set(tm.n_cold)
    if len(blocks) != 1 or any(t != tm.seen for t in tm.tokens()):
        raise ValueError(
            f"{tm.name}: truncate needs unpadded rows holding equal numbers of blocks, got {tm.n_cold} blocks "
            f"and {tm.tokens()} tokens of {tm.seen} positions"
        )
    nb = blocks.pop()
    if nb == 0 or n == 0 or n >= s + nb * bs:
        tm.crop(n)  # exact tiers only (or everything)
        return
    keep = max(0, (n - s) // bs)
    if keep:  # a row with cold blocks holds all its sinks, exact, at the front
        head_k, head_v, start = tm.exact_k[:, :, :s], tm.exact_v[:, :, :s], s + keep * bs
    else:  # no block survives: every kept token is exact, sinks included
        head_k, head_v, start = keys[:, :, :0], values[:, :, :0], 0
    ek = torch.cat((head_k, keys[:, :, start:n].to(tm.exact_k.dtype)), dim=2).contiguous()
    ev = torch.cat((head_v, values[:, :, start:n].to(tm.exact_v.dtype)), dim=2).contiguous()
    tm.exact_k, tm.exact_v = ek, ev
    tm.cold.narrow(keep)  # pools and, with no block left, the shared state and fitted flags
    tm.n_exact = [ek.shape[2]] * b
    tm.n_cold = [keep] * b
    tm.tail_valid = [n] * b
    tm.seen = n
    tm.version += 1  # the cold pools were replaced (a CUDA graph over them is stale)
