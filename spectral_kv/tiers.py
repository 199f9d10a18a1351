"""`TierManager`: the hot / warm / cold tiers of one attention layer (pure torch).

Per batch row, tokens live in stream order (padding dropped):

    [ sinks (first ``sink_tokens``, exact) | cold blocks (compressed) | warm | hot (exact) ]

The exact tokens (sinks + warm + hot) share one right-padded buffer ``exact_k/v``
``[B, H, W, D]`` with ``n_exact[b]`` valid tokens in row ``b``; sinks sit at its front.
When a row's warm tier holds ``block_size`` tokens beyond its hot window, the oldest
``block_size`` non-sink exact tokens become one cold block. Host-side counts (Python
ints) decide *when* to compress; the tensors only do the work ("plan on the host, run
on the device").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import ColdPool
from .compressors import COMPRESSORS, Compressor
from .config import SpectralConfig
from .static import StaticTiersMixin

__all__ = ["TierManager", "TierView"]

# Blocks compressed per compressor call: bounds the transient float32 copy made while a
# long prompt is compressed at prefill (64 blocks x 512 tokens per head).
MAX_BLOCKS_PER_CALL = 64


@dataclass
class TierView:
    """What attention reads from one layer (no copies of the pools).

    Attributes
    ----------
    exact_k, exact_v : Tensor [B, H, W, D]
    exact_valid : Tensor [B, W] bool, or None when every row has ``W`` valid tokens
    cold_k, cold_v : dict of Tensor [B, H, NB, ...]
    cold_valid : Tensor [B, NB] bool, or None when every row holds ``NB`` blocks
    """

    exact_k: torch.Tensor
    exact_v: torch.Tensor
    exact_valid: torch.Tensor | None
    cold_k: dict[str, torch.Tensor]
    cold_v: dict[str, torch.Tensor]
    cold_valid: torch.Tensor | None

    @property
    def n_cold_blocks(self) -> int:
        return next(iter(self.cold_k.values())).shape[2] if self.cold_k else 0


def _valid_mask(counts: list[int], width: int, device: torch.device) -> torch.Tensor | None:
    if all(c == width for c in counts):
        return None
    return torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


def crop_length(max_length, name: str) -> int:
    """``crop``'s argument as an int (transformers 5.17's assisted decoding passes a 0-d tensor);
    a `TypeError` naming ``name`` for anything else."""
    if isinstance(max_length, torch.Tensor) and max_length.numel() == 1 and not max_length.is_floating_point():
        max_length = int(max_length)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise TypeError(f"{name}: crop(max_length) needs an int, got {max_length!r}")
    return max_length


class TierManager(StaticTiersMixin):
    """Tiers of one layer for a batch of sequences.

    Dynamic by default (tensors grow as tokens arrive); `freeze` switches to static
    preallocated storage for CUDA-graph decode steps (`spectral_kv.static`).

    Parameters
    ----------
    config : SpectralConfig
    name : str
        Used in error messages (e.g. ``"layer 3"``).
    """

    def __init__(self, config: SpectralConfig, name: str = "layer") -> None:
        self.config = config
        self.name = name
        self.key_compressor: Compressor = COMPRESSORS[config.compressor_name("keys")](config, "keys", config.k_rank_keys)
        self.value_compressor: Compressor = COMPRESSORS[config.compressor_name("values")](
            config, "values", config.k_rank_values
        )
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        for p in getattr(self, "pending", ()):  # a side stream may still write into the pools being dropped
            if p.event is not None:
                torch.cuda.current_stream(self.exact_k.device).wait_event(p.event)
        self._init_static()
        self.version += 1
        self.exact_k: torch.Tensor | None = None
        self.exact_v: torch.Tensor | None = None
        self.n_exact: list[int] = []
        self.n_cold: list[int] = []
        self.cold_k = ColdPool()
        self.cold_v = ColdPool()
        self.seen = 0  # tokens appended per row, padding included (transformers' positions)
        # Per row: how many of the newest positions are real tokens (no padding among them);
        # `crop` can only remove positions it knows to be real tokens.
        self.tail_valid: list[int] = []

    @property
    def initialized(self) -> bool:
        return self.exact_k is not None

    @property
    def batch_size(self) -> int:
        return len(self.n_exact)

    def tokens(self) -> list[int]:
        """Real (non-padding) tokens held per row, all tiers together."""
        bs = self.config.block_size
        return [e + c * bs for e, c in zip(self.n_exact, self.n_cold)]

    # ------------------------------------------------------------------ append
    def _check(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
        if k.dim() != 4 or k.shape != v.shape:
            raise ValueError(
                f"{self.name}: keys and values must both be [batch, kv_heads, tokens, head_dim], "
                f"got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        if k.dtype != v.dtype or not k.is_floating_point():
            raise ValueError(f"{self.name}: keys/values must share one float dtype, got {k.dtype} and {v.dtype}")
        if valid is not None and (valid.dtype != torch.bool or tuple(valid.shape) != (k.shape[0], k.shape[2])):
            raise ValueError(
                f"{self.name}: valid must be bool [batch, tokens]={k.shape[0], k.shape[2]}, "
                f"got {valid.dtype} {tuple(valid.shape)}"
            )
        if self.initialized:
            b, h, _, d = self.exact_k.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
                raise ValueError(
                    f"{self.name}: update shaped {tuple(k.shape)} does not match the cache's "
                    f"batch={b}, kv_heads={h}, head_dim={d}"
                )
            if k.dtype != self.exact_k.dtype or k.device != self.exact_k.device:
                raise ValueError(
                    f"{self.name}: update is {k.dtype} on {k.device}, the cache holds "
                    f"{self.exact_k.dtype} on {self.exact_k.device}"
                )
        else:
            self.config.check_head_dim(k.shape[3])
        self._check_finite(k, v, valid)

    def _check_finite(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
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
            f"{self.name}: {'/'.join(which)} of batch row(s) {rows} hold NaN/Inf; refusing to store them "
            f"(the model produced non-finite {'/'.join(which)})"
        )

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append new tokens, then compress every block that became ready.

        Parameters
        ----------
        k, v : Tensor [B, H, T, D]
            Keys / values of ``T`` new positions (post-RoPE, as attention uses them).
        valid : Tensor [B, T] bool, optional
            False marks padding positions: they are dropped, never stored or compressed.
        """
        self._check(k, v, valid)
        b, h, t, d = k.shape
        if not self.initialized:
            self.exact_k = k.new_zeros(b, h, 0, d)
            self.exact_v = v.new_zeros(b, h, 0, d)
            self.n_exact = [0] * b
            self.n_cold = [0] * b
            self.tail_valid = [0] * b
        self.seen += t
        if t == 0:
            return
        self.thaw()  # a frozen cache takes more than one token at a time in the dynamic layout
        self._track_tail(valid, t)
        width = self.exact_k.shape[2]
        if (valid is None or bool(valid.all())) and all(n == width for n in self.n_exact):
            # Common case (no padding): one concatenation, like DynamicCache.
            self.exact_k = torch.cat((self.exact_k, k), dim=2)
            self.exact_v = torch.cat((self.exact_v, v), dim=2)
            self.n_exact = [n + t for n in self.n_exact]
        else:
            self._append_ragged(k, v, valid)
        self._compress_ready()

    def _track_tail(self, valid: torch.Tensor | None, t: int) -> None:
        if valid is None or bool(valid.all()):
            self.tail_valid = [n + t for n in self.tail_valid]
            return
        # Trailing real positions of this update: t - 1 - (index of the last padding position).
        pos = torch.arange(t, device=valid.device).expand_as(valid)
        last_pad = torch.where(valid, -1, pos).max(dim=1).values.tolist()
        self.tail_valid = [n + t if lp < 0 else t - 1 - lp for n, lp in zip(self.tail_valid, last_pad)]

    def _append_ragged(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None) -> None:
        b, h, t, d = k.shape
        if valid is None:
            valid = torch.ones(b, t, dtype=torch.bool, device=k.device)
        keep = [valid[i].nonzero().squeeze(1) for i in range(b)]
        new_counts = [n + int(idx.numel()) for n, idx in zip(self.n_exact, keep)]
        width = max(new_counts)
        ek, ev = k.new_zeros(b, h, width, d), v.new_zeros(b, h, width, d)
        for i in range(b):
            n = self.n_exact[i]
            ek[i, :, :n] = self.exact_k[i, :, :n]
            ev[i, :, :n] = self.exact_v[i, :, :n]
            ek[i, :, n : new_counts[i]] = k[i][:, keep[i]]
            ev[i, :, n : new_counts[i]] = v[i][:, keep[i]]
        self.exact_k, self.exact_v, self.n_exact = ek, ev, new_counts

    # ------------------------------------------------------------------ compress
    def _compress_ready(self) -> None:
        c = self.config
        s, bs, hot = c.sink_tokens, c.block_size, c.hot_buffer_size
        ready = [max(0, (n - s - hot) // bs) for n in self.n_exact]
        if self._deferred() or not any(ready):  # (the one-shot deferral is consumed either way)
            return
        pairs = [(row, j) for row, m in enumerate(ready) for j in range(m)]
        for start in range(0, len(pairs), MAX_BLOCKS_PER_CALL):
            self._compress_pairs(pairs[start : start + MAX_BLOCKS_PER_CALL])
        self._drop_compressed(ready)

    def _compress_pairs(self, pairs: list[tuple[int, int]], check: bool = True) -> torch.Tensor:
        """Compress block ``j`` (after the sinks) of row ``row`` for each pair into its cold slot.

        Returns a 0-d bool tensor: every compressed token was finite. With ``check`` a
        non-finite block raises at once (a host sync); without, nothing syncs, so it can run
        on a side stream, and static storage reads the flag when it swaps the blocks in.
        """
        c = self.config
        s, bs = c.sink_tokens, c.block_size
        b, h, _, d = self.exact_k.shape
        dev = self.exact_k.device
        host_slots = [self.n_cold[row] + j for row, j in pairs]
        rows = torch.tensor([row for row, _ in pairs]).to(dev, non_blocking=True)
        slots = torch.tensor(host_slots).to(dev, non_blocking=True)
        finite = []
        for pool, exact, comp in (
            (self.cold_k, self.exact_k, self.key_compressor),
            (self.cold_v, self.exact_v, self.value_compressor),
        ):
            blocks = torch.stack([exact[row, :, s + j * bs : s + (j + 1) * bs] for row, j in pairs])
            finite.append(torch.isfinite(blocks).all())
            if check and not bool(finite[-1]):
                bad = sorted({row for (row, j), blk in zip(pairs, blocks) if not bool(torch.isfinite(blk).all())})
                raise ValueError(
                    f"{self.name}: {comp.role} of batch row(s) {bad} hold NaN/Inf in a block about to be "
                    f"compressed; refusing to store a corrupted cold block (the model produced non-finite "
                    f"{comp.role})"
                )
            parts = comp.compress(blocks.reshape(len(pairs) * h, bs, d).float())
            parts = {name: t.reshape(len(pairs), h, *t.shape[1:]) for name, t in parts.items()}
            pool.write(b, rows, slots, parts, needed=max(host_slots) + 1)
        return torch.stack(finite).all()

    def _drop_compressed(self, ready: list[int]) -> None:
        s, bs = self.config.sink_tokens, self.config.block_size
        width = self.exact_k.shape[2]
        if len(set(ready)) == 1 and all(n == width for n in self.n_exact):
            cut = s + ready[0] * bs
            self.exact_k = torch.cat((self.exact_k[:, :, :s], self.exact_k[:, :, cut:]), dim=2)
            self.exact_v = torch.cat((self.exact_v[:, :, :s], self.exact_v[:, :, cut:]), dim=2)
        else:
            new_counts = [n - m * bs for n, m in zip(self.n_exact, ready)]
            b, h, _, d = self.exact_k.shape
            ek = self.exact_k.new_zeros(b, h, max(new_counts), d)
            ev = self.exact_v.new_zeros(b, h, max(new_counts), d)
            for i, (n, m) in enumerate(zip(self.n_exact, ready)):
                src = torch.cat((torch.arange(s), torch.arange(s + m * bs, n))).to(ek.device)
                ek[i, :, : src.numel()] = self.exact_k[i][:, src]
                ev[i, :, : src.numel()] = self.exact_v[i][:, src]
            self.exact_k, self.exact_v = ek, ev
        self.n_exact = [n - m * bs for n, m in zip(self.n_exact, ready)]
        self.n_cold = [c + m for c, m in zip(self.n_cold, ready)]

    # ------------------------------------------------------------------ read
    def view(self) -> TierView:
        """The tensors attention reads, with validity masks for ragged rows."""
        if not self.initialized:
            raise RuntimeError(f"{self.name}: the cache is empty")
        dev = self.exact_k.device
        nb = self.cold_k.n_blocks
        return TierView(
            exact_k=self.exact_k,
            exact_v=self.exact_v,
            exact_valid=_valid_mask(self.n_exact, self.exact_k.shape[2], dev),
            cold_k=self.cold_k.parts,
            cold_v=self.cold_v.parts,
            cold_valid=_valid_mask(self.n_cold, nb, dev) if nb else None,
        )

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Every held token in stream order, cold blocks decompressed.

        Returns
        -------
        keys, values : Tensor [B, H, L, D]
            Row ``b``'s first ``tokens()[b]`` positions are its tokens in order.
        valid : Tensor [B, L] bool, or None when all rows hold ``L`` tokens
        """
        if not self.initialized:
            raise RuntimeError(f"{self.name}: the cache is empty")
        s, bs = self.config.sink_tokens, self.config.block_size
        dtype = self.exact_k.dtype
        nb = self.cold_k.n_blocks
        b, h, _, d = self.exact_k.shape
        if nb == 0:
            return self.exact_k, self.exact_v, _valid_mask(self.n_exact, self.exact_k.shape[2], self.exact_k.device)
        ck = self.key_compressor.decompress(self.cold_k.parts, dtype).reshape(b, h, nb * bs, d)
        cv = self.value_compressor.decompress(self.cold_v.parts, dtype).reshape(b, h, nb * bs, d)
        counts = self.tokens()
        length = max(counts)
        keys, values = ck.new_zeros(b, h, length, d), cv.new_zeros(b, h, length, d)
        for i in range(b):
            # Rows that hold cold blocks have all their sinks (blocks start after them).
            sinks = s if self.n_cold[i] else 0
            cold_len = self.n_cold[i] * bs
            for out, exact, cold in ((keys, self.exact_k, ck), (values, self.exact_v, cv)):
                out[i, :, :sinks] = exact[i, :, :sinks]
                out[i, :, sinks : sinks + cold_len] = cold[i, :, :cold_len]
                out[i, :, sinks + cold_len : counts[i]] = exact[i, :, sinks : self.n_exact[i]]
        return keys, values, _valid_mask(counts, length, keys.device)

    # ------------------------------------------------------------------ batch ops
    def select_rows(self, index: torch.Tensor) -> None:
        """Reorder / select / repeat batch rows (beam search and batch expansion)."""
        if not self.initialized:
            return
        self.thaw()
        idx = index.to(self.exact_k.device).long()
        if idx.dim() != 1:
            raise ValueError(f"{self.name}: row index must be 1-D, got shape {tuple(idx.shape)}")
        host = idx.tolist()
        bad = [i for i in host if not -self.batch_size <= i < self.batch_size]
        if bad:
            raise IndexError(f"{self.name}: row index {bad} out of range for a batch of {self.batch_size}")
        host = [i % self.batch_size for i in host]
        idx = torch.tensor(host, dtype=torch.long, device=self.exact_k.device)
        self.exact_k = self.exact_k.index_select(0, idx)
        self.exact_v = self.exact_v.index_select(0, idx)
        self.n_exact = [self.n_exact[i] for i in host]
        self.n_cold = [self.n_cold[i] for i in host]
        self.tail_valid = [self.tail_valid[i] for i in host]
        self.cold_k.select_rows(idx)
        self.cold_v.select_rows(idx)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop ``-max_length``), like ``DynamicLayer.crop``.

        Exact whenever every removed position is a real token held in the exact tiers, which
        always holds for the ``hot_buffer_size`` newest tokens right after an update, and when
        everything is removed (``max_length <= 0``: the tiers are reset).
        Otherwise raises `NotImplementedError` naming the boundary: a token folded into a
        compressed block cannot be removed on its own.
        """
        max_length = crop_length(max_length, self.name)
        if max_length < 0:
            max_length = self.seen + max_length
        drop = self.seen - max(max_length, 0)
        if drop <= 0 or not self.initialized:
            return
        if max_length <= 0:  # everything goes: exact whatever the tiers hold
            self.reset()
            return
        self.thaw()
        s = self.config.sink_tokens
        for i in range(self.batch_size):
            if drop > self.tail_valid[i]:
                raise NotImplementedError(
                    f"{self.name}: crop(max_length={max_length}) removes the last {drop} positions, but only the "
                    f"last {self.tail_valid[i]} of batch row {i} are known to be real tokens (padding lies "
                    f"beyond); cropping across padding is not supported"
                )
            removable = self.n_exact[i] - (s if self.n_cold[i] else 0)
            if drop > removable:
                boundary = self.seen - removable
                raise NotImplementedError(
                    f"{self.name}: crop(max_length={max_length}) would remove {drop} tokens, but batch row {i} holds "
                    f"only its {removable} newest tokens exactly (positions >= {boundary}); tokens before that are "
                    f"folded into {self.n_cold[i]} compressed block(s) and cannot be removed one by one. Crops of "
                    f"at most hot_buffer_size={self.config.hot_buffer_size} tokens after an update are always exact"
                )
        self.n_exact = [n - drop for n in self.n_exact]
        self.tail_valid = [n - drop for n in self.tail_valid]
        self.seen -= drop
        width = max(self.n_exact)
        self.exact_k = self.exact_k[:, :, :width].contiguous()
        self.exact_v = self.exact_v[:, :, :width].contiguous()

    def restore(
        self,
        exact_k: torch.Tensor,
        exact_v: torch.Tensor,
        cold_k: dict[str, torch.Tensor],
        cold_v: dict[str, torch.Tensor],
        n_exact: list[int],
        n_cold: list[int],
        tail_valid: list[int],
        seen: int,
    ) -> None:
        """Install a saved state (validated by `spectral_kv.persist`)."""
        self.reset()
        self.exact_k, self.exact_v = exact_k, exact_v
        self.cold_k.parts, self.cold_v.parts = dict(cold_k), dict(cold_v)
        self.n_exact, self.n_cold, self.tail_valid = list(n_exact), list(n_cold), list(tail_valid)
        self.seen = int(seen)

    # ------------------------------------------------------------------ bytes
    def memory_report(self) -> dict[str, int]:
        """Bytes held, from the tensors themselves (``numel * element_size``).

        Keys: ``cold_keys``, ``cold_values`` (every pool part), ``sinks``, ``warm``, ``hot``
        (the exact buffer split by the tokens each tier owns), ``padding`` (exact-buffer
        slots of shorter rows), ``total_bytes``, ``dense_bytes`` (what a DynamicCache would
        hold for the same positions and dtype) and ``tokens`` (real tokens, all rows).
        """
        rep = {"cold_keys": self.cold_k.nbytes(), "cold_values": self.cold_v.nbytes()}
        rep.update(sinks=0, warm=0, hot=0, padding=0, dense_bytes=0, tokens=sum(self.tokens()))
        if self.initialized:
            b, h, w, d = self.exact_k.shape
            per_token = h * d * (self.exact_k.element_size() + self.exact_v.element_size())
            s, hot = self.config.sink_tokens, self.config.hot_buffer_size
            for n in self.n_exact:
                sinks = min(s, n)
                hot_n = min(hot, n - sinks)
                rep["sinks"] += sinks * per_token
                rep["hot"] += hot_n * per_token
                rep["warm"] += (n - sinks - hot_n) * per_token
                rep["padding"] += (w - n) * per_token
            rep["dense_bytes"] = self.seen * b * per_token
        rep["total_bytes"] = sum(rep[k] for k in ("cold_keys", "cold_values", "sinks", "warm", "hot", "padding"))
        return rep

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds (for checking the memory report)."""
        out = [t for t in (self.exact_k, self.exact_v) if t is not None]
        return out + list(self.cold_k.parts.values()) + list(self.cold_v.parts.values())

    # ------------------------------------------------------------------ dense access (clients)
    # Code written against DynamicCache reads and writes a layer's ``keys`` / ``values``; kvpress
    # presses read them in a forward hook right after the prefill's attention and write back the
    # tokens they keep. `dense` and `replace` serve that; `defer_next_compression` lets a press act
    # on the uncompressed prompt: the integration sets it for one multi-token update when the
    # attention module carries forward hooks (the place presses run), so the prompt's ready
    # blocks are compressed by the layer's next append instead (before that step attends: its
    # `view` still holds them exactly). Without hooks nothing is deferred, so peak memory during a
    # long prefill stays one layer's prompt, not every layer's.
    defer_next_compression = False

    def _deferred(self) -> bool:
        """True once, when `defer_next_compression` asks this append to leave its blocks exact."""
        if self.defer_next_compression:
            self.defer_next_compression = False
            return True
        return False

    def settle(self) -> None:
        """Compress the blocks a deferred update left exact (no-op when there are none)."""
        if self.initialized and not self.static:
            self.defer_next_compression = False
            self._compress_ready()

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values as attention reads them, ``[B, H, L, D]`` in the model's dtype.

        ``L`` = `seen` (every row holds every position: no padding). With nothing compressed
        these are the exact buffers themselves (as `DynamicCache` returns its own tensors);
        otherwise a full-precision copy with the cold blocks decompressed, built on each call
        (it costs what a `DynamicCache` of the same length holds). A padded batch (rows holding
        different numbers of real tokens) has no such layout: `ValueError`.
        """
        if not self.initialized:
            raise RuntimeError(f"{self.name}: the cache is empty")
        tokens = self.tokens()
        if any(n != self.seen for n in tokens):
            raise ValueError(
                f"{self.name}: rows hold {tokens} real tokens of {self.seen} positions (a padded batch); "
                f"keys/values in DynamicCache's [batch, heads, positions, head_dim] layout need unpadded rows "
                f"(read tiers.materialize() instead)"
            )
        self.thaw()  # static storage keeps spare slots in the exact buffer
        keys, values, _ = self.materialize()
        return keys, values

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Install ``keys`` / ``values`` ``[B, H, L', D]`` as the layer's whole contents.

        What a kvpress press does after the prefill (``L'`` = the tokens it keeps). Allowed only
        while nothing is compressed (compressed tokens cannot be re-chosen one by one): otherwise
        `NotImplementedError` naming the operation. The new tokens are compressed at the next
        append, so a second writer (kvpress' ComposedPress) also sees them exactly. The batch,
        heads and head_dim must match: `ValueError`. `seen` becomes ``L'``.
        """
        if any(self.n_cold):
            raise NotImplementedError(
                f"{self.name}: writing layer.keys/values (replacing the cache contents, as a kvpress press "
                f"does) needs an uncompressed layer, but rows hold {self.n_cold} compressed block(s) of "
                f"{self.config.block_size} tokens; presses compose under the 'spectral_kv' attention, which "
                f"defers a prompt's compression while its attention module has forward hooks"
            )
        if self.initialized:
            b, h, _, d = self.exact_k.shape
            if (keys.shape[0], keys.shape[1], keys.shape[3]) != (b, h, d):
                raise ValueError(
                    f"{self.name}: replacing keys shaped {tuple(keys.shape)}: the cache holds batch={b}, "
                    f"kv_heads={h}, head_dim={d}"
                )
        self.reset()
        self.defer_next_compression = True
        self.append(keys, values)

    def truncate(self, n: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the first ``n`` positions, where ``keys`` / ``values`` ``[B, H, n, D]`` are
        `dense()`'s first ``n`` positions (kvpress removing an answer assigns exactly that).

        A cut inside the exact tiers is `crop`. A cut inside the cold blocks keeps the blocks
        wholly before it, drops the rest, and holds the surviving tokens of the cut block
        exactly, as the given (decompressed) values: attention then reads the same K/V it read
        before the cut. Those tokens are compressed again when their block fills (a second
        rounding of values already on the code grid). Rows must be unpadded (as for `dense`).
        """
        self.thaw()
        s, bs = self.config.sink_tokens, self.config.block_size
        cold = set(self.n_cold)
        if len(cold) != 1 or any(t != self.seen for t in self.tokens()):
            raise ValueError(f"{self.name}: truncate needs unpadded rows holding equal blocks, got {self.n_cold} blocks")
        nb = cold.pop()
        if n >= s + nb * bs or nb == 0:
            self.crop(n)
            return
        keep = max(0, (n - s) // bs) if n > s else 0
        if keep:  # a row with cold blocks holds all its sinks, exact, at the front
            head_k, head_v, start = self.exact_k[:, :, :s], self.exact_v[:, :, :s], s + keep * bs
        else:  # no block survives: every kept token is exact, sinks included
            head_k, head_v, start = keys[:, :, :0], values[:, :, :0], 0
        self.exact_k = torch.cat((head_k, keys[:, :, start:n].to(self.exact_k.dtype)), dim=2).contiguous()
        self.exact_v = torch.cat((head_v, values[:, :, start:n].to(self.exact_v.dtype)), dim=2).contiguous()
        for pool in (self.cold_k, self.cold_v):
            pool.narrow(keep)
        width = self.exact_k.shape[2]
        self.n_exact = [width] * self.batch_size
        self.n_cold = [keep] * self.batch_size
        self.tail_valid = [n] * self.batch_size
        self.seen = n
        self.version += 1
