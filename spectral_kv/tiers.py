"""`TierManager`: the hot / warm / cold tiers of one attention layer (pure torch).

Per batch row, tokens live in stream order (padding dropped):

    [ sinks (first ``sink_tokens``, exact) | cold blocks (compressed) | warm | hot (exact) ]

The exact tokens (sinks + warm + hot) share one right-padded buffer ``exact_k/v``
``[B, H, W, D]`` with ``n_exact[b]`` valid tokens in row ``b``; sinks sit at its front.
When a row's warm tier holds ``block_size`` tokens beyond its hot window, the oldest
``block_size`` non-sink exact tokens become one cold block (`spectral_kv.blocks.ColdTier`).
Host-side counts (Python ints) decide *when* to compress; the tensors only do the work
("plan on the host, run on the device").

One attention call is ``view = tiers.view(k, v, mask)`` (stages the new tokens and returns an
`AttendView` that includes them), ``strategy.attend(q, view, scaling)``, then
``tiers.commit()`` (the staged tokens join the tiers; full warm blocks go cold).

Storage is dynamic (tensors grow as tokens arrive) until `freeze` hands the exact buffers to a
`StaticStorage` (preallocated, device counters: CUDA-graph decode steps) and `thaw` takes them
back. Any operation other than a one-token decode step thaws first.

Clients written against `DynamicCache` (kvpress) read and write the layer densely: `dense`,
`replace`, `truncate` and the one-shot `defer_next_compression` (`spectral_kv.dense_access`).

Why this module is longer than ~350 lines: the tier manager's state changes (append, compress,
view/commit, freeze/thaw, row operations, crop, state_dict) all read and write the same host
counts and are read together; input checks live in `spectral_kv.checks`, the cold side in
`spectral_kv.blocks`, static storage in `spectral_kv.static`, the view in `spectral_kv.view`,
dense client access in `spectral_kv.dense_access`.
"""

from __future__ import annotations

from typing import Any

import torch

from .blocks import MAX_BLOCKS_PER_CALL, ColdTier
from .checks import DeferredFinite, check_update, crop_length, defers_finite
from .compressors.base import Compressor
from .config import SpectralConfig
from .dense_access import dense as _dense
from .dense_access import replace as _replace
from .dense_access import truncate as _truncate
from .registry import COMPRESSORS
from .static import StaticStorage
from .view import AttendView, new_tokens_real, stage_dynamic

__all__ = ["TierManager", "AttendView", "crop_length"]


def _valid_mask(counts: list[int], width: int, device: torch.device) -> torch.Tensor | None:
    if all(c == width for c in counts):
        return None
    return torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]


def _bool_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is not None and mask.dtype != torch.bool:  # an additive float mask: 0 = attend
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


class TierManager:
    """Tiers of one layer for a batch of sequences.

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
        self.storage: StaticStorage | None = None
        self.version = 0  # bumped whenever static buffers are (re)allocated or released
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        if self.storage is not None:  # a side stream may still write into the pools being dropped
            self.storage.wait()
        self.storage = None
        self.version += 1
        self._exact_k: torch.Tensor | None = None
        self._exact_v: torch.Tensor | None = None
        self.n_exact: list[int] = []
        self.n_cold: list[int] = []
        self.cold = ColdTier(self.config, self.key_compressor, self.value_compressor, self.name)
        self.seen = 0  # tokens appended per row, padding included (transformers' positions)
        # Per row: how many of the newest positions are real tokens (no padding among them);
        # `crop` can only remove positions it knows to be real tokens.
        self.tail_valid: list[int] = []
        self._staged: tuple | None = None
        self._finite = DeferredFinite(self.name)  # decode updates on CUDA: checked without a sync
        # One-shot: the next append leaves its ready blocks exact, for a kvpress press to read
        # and rewrite the prompt (set by the integration; `spectral_kv.dense_access`).
        self.defer_next_compression = False

    @property
    def exact_k(self) -> torch.Tensor | None:
        """Exact keys [B, H, W, D] (the frozen buffer while static)."""
        return self.storage.exact_k if self.storage is not None else self._exact_k

    @exact_k.setter
    def exact_k(self, value: torch.Tensor) -> None:  # benchmarks install synthetic tiers
        self._set_exact("exact_k", value)

    @property
    def exact_v(self) -> torch.Tensor | None:
        return self.storage.exact_v if self.storage is not None else self._exact_v

    @exact_v.setter
    def exact_v(self, value: torch.Tensor) -> None:
        self._set_exact("exact_v", value)

    def _set_exact(self, name: str, value: torch.Tensor) -> None:
        if self.storage is not None:
            raise RuntimeError(f"{self.name}: {name} of a frozen layer belongs to its static storage; thaw() first")
        setattr(self, f"_{name}", value)

    @property
    def cold_k(self):
        """The key `ColdPool` (``.parts``: dict of [B, H, NB, ...])."""
        return self.cold.k

    @property
    def cold_v(self):
        return self.cold.v

    @property
    def static(self) -> bool:
        """Frozen: decode steps run on `StaticStorage`."""
        return self.storage is not None

    @property
    def n_exact_t(self) -> torch.Tensor | None:
        """Device twin of ``n_exact`` (int32 [B]) while static, else None."""
        return None if self.storage is None else self.storage.n_exact_t

    @property
    def n_cold_t(self) -> torch.Tensor | None:
        return None if self.storage is None else self.storage.n_cold_t

    @property
    def pending(self) -> list:
        """Blocks being compressed in the background (static storage with ``compress_lag``)."""
        return [] if self.storage is None else self.storage.pending

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
        # Unpadded updates of an initialized layer on CUDA (decode steps) are checked for NaN/Inf
        # on the device and read later (`checks.DeferredFinite`); everything else at once.
        defer = valid is None and self.initialized and defers_finite(k.device)
        check_update(self.name, self.config, k, v, valid, self.exact_k, finite=not defer)
        if defer:
            self._finite.add(k, v, self.seen)

    def append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Append new tokens, then compress every block that became ready.

        Parameters
        ----------
        k, v : Tensor [B, H, T, D]
            Keys / values of ``T`` new positions (post-RoPE, as attention uses them).
        valid : Tensor [B, T] bool, optional
            False marks padding positions: they are dropped, never stored or compressed.
        """
        self._append(k, v, valid, None)

    def _append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                joined: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        # ``joined``: (exact_k, exact_v) already concatenated with k, v (by `view`, for
        # attention), reused in the common case instead of concatenating again (`commit`).
        self._check(k, v, valid)
        b, h, t, d = k.shape
        if not self.initialized:
            self._exact_k = k.new_zeros(b, h, 0, d)
            self._exact_v = v.new_zeros(b, h, 0, d)
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
            if joined is not None:
                self._exact_k, self._exact_v = joined
            else:
                self._exact_k = torch.cat((self._exact_k, k), dim=2)
                self._exact_v = torch.cat((self._exact_v, v), dim=2)
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
        self._exact_k, self._exact_v, self.n_exact = ek, ev, new_counts

    # ------------------------------------------------------------------ compress
    def _compress_ready(self) -> None:
        c = self.config
        s, bs, hot = c.sink_tokens, c.block_size, c.hot_buffer_size
        ready = [max(0, (n - s - hot) // bs) for n in self.n_exact]
        if self.defer_next_compression:  # consumed whether or not a block was ready
            self.defer_next_compression = False
            return
        if not any(ready):
            return
        self._finite.resolve(self.seen)  # nothing non-finite may reach a cold block
        self.cold.compress(self._exact_k, self._exact_v, ready, self.n_cold, check=True, per_call=MAX_BLOCKS_PER_CALL)
        self._drop_compressed(ready)

    def _drop_compressed(self, ready: list[int]) -> None:
        s, bs = self.config.sink_tokens, self.config.block_size
        width = self.exact_k.shape[2]
        if len(set(ready)) == 1 and all(n == width for n in self.n_exact):
            cut = s + ready[0] * bs
            self._exact_k = torch.cat((self._exact_k[:, :, :s], self._exact_k[:, :, cut:]), dim=2)
            self._exact_v = torch.cat((self._exact_v[:, :, :s], self._exact_v[:, :, cut:]), dim=2)
        else:
            new_counts = [n - m * bs for n, m in zip(self.n_exact, ready)]
            b, h, _, d = self.exact_k.shape
            ek = self.exact_k.new_zeros(b, h, max(new_counts), d)
            ev = self.exact_v.new_zeros(b, h, max(new_counts), d)
            for i, (n, m) in enumerate(zip(self.n_exact, ready)):
                src = torch.cat((torch.arange(s), torch.arange(s + m * bs, n))).to(ek.device)
                ek[i, :, : src.numel()] = self.exact_k[i][:, src]
                ev[i, :, : src.numel()] = self.exact_v[i][:, src]
            self._exact_k, self._exact_v = ek, ev
        self.n_exact = [n - m * bs for n, m in zip(self.n_exact, ready)]
        self.n_cold = [c + m for c, m in zip(self.n_cold, ready)]

    # ------------------------------------------------------------------ attend
    def view(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             *, check: bool = True) -> AttendView:
        """Stage new tokens and return what attention reads, the staged tokens included.

        Parameters
        ----------
        k, v : Tensor [B, H, Tq, D], optional
            The new tokens (post-RoPE). Without them the view holds the stored tiers only
            (its ``exact_mask`` is then [B, 1, 1, W] or None) and there is nothing to `commit`.
        mask : Tensor [B, 1, Tq, seen + Tq] bool or additive float, optional
            transformers' mask in its (padded) positions; None: causal, no padding.
        check : bool
            Static decode steps only: check the token (finite, the mask says it is real) on the
            host. A CUDA-graph driver passes False and checks the logits instead.

        Returns
        -------
        AttendView
            Static storage and one token: device counts (no host sync, fixed addresses).
            Otherwise masks, decided on the host from the host counts.
        """
        mask = _bool_mask(mask)
        self._staged = None
        if k is not None and self.static and k.shape[2] == 1:
            if check:
                self._check(k, v, None)
                if mask is not None and not bool(mask[:, 0, -1, -1].all()):
                    raise ValueError(
                        f"SpectralCache {self.name}: a frozen (static) cache takes decode tokens that are real tokens; "
                        f"the attention mask marks the new token of some row as padding"
                    )
            self.storage.stage(k, v)
            self._staged = ("static",)
            return AttendView(self.exact_k, self.exact_v, self.cold.k.parts, self.cold.v.parts, self.cold.shared_k,
                              self.cold.shared_v, n_exact=self.storage.n_exact_t, n_cold=self.storage.n_cold_t,
                              cold_in_use=max(self.n_cold, default=0))
        if not self.initialized and k is None:
            raise RuntimeError(f"{self.name}: the cache is empty")
        tq = 0 if k is None else k.shape[2]
        if mask is not None and mask.shape[-1] != self.seen + tq:
            raise ValueError(
                f"SpectralCache {self.name}: attention mask covers {mask.shape[-1]} positions, "
                f"the cache expects {self.seen + tq}"
            )
        cold_valid = None
        if self.initialized:
            ek, ev = self.exact_k, self.exact_v
            valid = _valid_mask(self.n_exact, ek.shape[2], ek.device)
            nb = self.cold.k.n_blocks
            cold_valid = _valid_mask(self.n_cold, nb, ek.device) if nb else None
        else:
            ek, ev, valid = k[:, :, :0], v[:, :, :0], None
        if k is None:
            exact_mask = None if valid is None else valid[:, None, None, :]
        else:
            held = ek
            ek, ev, exact_mask, valid_new = stage_dynamic(ek, ev, valid, k, v, mask)
            # The view's concatenation is what `append` would build when every row fills the
            # buffer (valid None) and the new tokens are real; `commit` then reuses it.
            joined = (ek, ev) if self.initialized and valid is None and not self.static else None
            self._staged = (k, v, valid_new, mask, held, joined)
        return AttendView(ek, ev, self.cold.k.parts, self.cold.v.parts, self.cold.shared_k, self.cold.shared_v,
                          exact_mask=exact_mask, cold_valid=cold_valid)

    def commit(self, advance: bool = True) -> None:
        """The staged tokens join the tiers (full warm blocks go cold).

        ``advance=False`` (static decode steps under a CUDA-graph driver, `spectral_kv.graphs`)
        leaves the host side of the step to a later `advance` call.
        """
        staged, self._staged = self._staged, None
        if staged is None:
            raise RuntimeError(f"{self.name}: commit() without tokens staged by view(k, v)")
        if staged == ("static",):
            if advance:
                self.advance()
            return
        k, v, valid_new, mask, held, joined = staged
        if valid_new is None or new_tokens_real(mask, k.shape[2]):
            # reuse the view's concatenation only if the buffer it extended is still the one held
            self._append(k, v, None, joined if joined is not None and held is self._exact_k else None)
        else:
            self.append(k, v, valid_new.contiguous())

    def _shared_kw(self, role: str) -> dict[str, Any]:
        shared = self.cold.shared(role)
        return {"shared": {n: t.unsqueeze(2) for n, t in shared.items()}} if shared else {}

    # ------------------------------------------------------------------ static storage
    def freeze(self, new_tokens: int) -> None:
        """Preallocate for ``new_tokens`` more decode tokens and switch to static decode steps."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"{self.name}: freeze(new_tokens) needs a non-negative int, got {new_tokens!r}")
        if not self.initialized:
            raise RuntimeError(f"{self.name}: freeze() needs a prefilled cache (run the prompt first)")
        self.settle()  # a press-deferred (or truncated) prompt holds more exact tokens than the static width
        if self.storage is not None:
            self.version += self.storage.reserve(self.n_exact, self.n_cold, new_tokens)
            return
        self.storage = StaticStorage(self.config, self.name, self.cold, self._exact_k, self._exact_v,
                                     self.n_exact, self.n_cold, new_tokens)
        self._exact_k = self._exact_v = None
        self.version += 2  # the exact buffers moved, and the pools grew

    def thaw(self) -> None:
        """Back to the dynamic layout (pending blocks swapped in, spare capacity released)."""
        if self.storage is None:
            return
        self._exact_k, self._exact_v = self.storage.thaw(self.n_exact, self.n_cold)
        self.storage = None
        self.version += 1

    def append_static(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per row at its row's count (device-side; capturable)."""
        self.storage.stage(k, v)

    def advance(self) -> None:
        """Host side of one static decode step, run after it: counts, then blocks in and out."""
        self.n_exact = [n + 1 for n in self.n_exact]
        self.tail_valid = [n + 1 for n in self.tail_valid]
        self.seen += 1
        self.version += self.storage.advance(self.n_exact, self.n_cold)

    def drain(self) -> None:
        """Wait for blocks still being compressed and swap them in (before anything else runs)."""
        if self.storage is not None and self.storage.pending:
            self.storage.commit(self.n_exact, self.n_cold, due_only=False)

    # ------------------------------------------------------------------ dense access (clients)
    def settle(self) -> None:
        """Compress the blocks a deferred update (or `truncate`) left exact; no-op when none are ready."""
        if self.initialized and not self.static:
            self.defer_next_compression = False
            self._compress_ready()

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values ``[B, H, seen, D]`` as attention reads them (`spectral_kv.dense_access.dense`)."""
        return _dense(self)

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """New contents ``[B, H, L', D]``, uncompressed layers only (`spectral_kv.dense_access.replace`)."""
        _replace(self, keys, values)

    def truncate(self, n: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the first ``n`` positions, given `dense`'s first ``n`` (`spectral_kv.dense_access.truncate`)."""
        _truncate(self, n, keys, values)

    # ------------------------------------------------------------------ read
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
        nb = self.cold.k.n_blocks
        b, h, _, d = self.exact_k.shape
        if nb == 0:
            return self.exact_k, self.exact_v, _valid_mask(self.n_exact, self.exact_k.shape[2], self.exact_k.device)
        ck = self.key_compressor.decompress(self.cold.k.parts, dtype, **self._shared_kw("k")).reshape(b, h, nb * bs, d)
        cv = self.value_compressor.decompress(self.cold.v.parts, dtype, **self._shared_kw("v")).reshape(b, h, nb * bs, d)
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
        self._exact_k = self._exact_k.index_select(0, idx)
        self._exact_v = self._exact_v.index_select(0, idx)
        self.n_exact = [self.n_exact[i] for i in host]
        self.n_cold = [self.n_cold[i] for i in host]
        self.tail_valid = [self.tail_valid[i] for i in host]
        self.cold.select_rows(idx, host)

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop ``-max_length``), like ``DynamicLayer.crop``.

        Exact whenever every removed position is a real token held in the exact tiers, which
        always holds for the ``hot_buffer_size`` newest tokens right after an update, and when
        everything is removed (``max_length <= 0``: the tiers are reset).
        Otherwise raises `NotImplementedError` naming the boundary: a token folded into a
        compressed block cannot be removed on its own.
        """
        max_length = crop_length(max_length, self.name)
        self._finite.resolve(self.seen)
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
        self._exact_k = self._exact_k[:, :, :width].contiguous()
        self._exact_v = self._exact_v[:, :, :width].contiguous()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Everything this layer holds, in the dynamic layout (a frozen layer thaws first).

        Returns ``{"initialized": bool}`` plus, once initialized, the tensors ``exact_k``,
        ``exact_v`` [B, H, W, D], ``cold_k.<part>`` / ``cold_v.<part>`` [B, H, NB, ...],
        ``shared_k.<name>`` / ``shared_v.<name>`` [B, H, ...] and the host counts ``n_exact``,
        ``n_cold``, ``tail_valid`` (lists of int), ``seen`` (int) and, for compressors with
        shared state, ``fitted`` (list of bool).
        """
        self._finite.resolve(self.seen)
        self.thaw()
        if not self.initialized:
            return {"initialized": False}
        state: dict[str, Any] = {"initialized": True, "exact_k": self.exact_k, "exact_v": self.exact_v}
        for role in ("k", "v"):
            state.update({f"cold_{role}.{n}": t for n, t in self.cold.pool(role).parts.items()})
            state.update({f"shared_{role}.{n}": t for n, t in self.cold.shared(role).items()})
        state.update(n_exact=list(self.n_exact), n_cold=list(self.n_cold), tail_valid=list(self.tail_valid), seen=self.seen)
        if self.cold.stateful(self.exact_k.shape[3]):
            state["fitted"] = list(self.cold.fitted)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Install a `state_dict` (validated by the caller: `spectral_kv.integrations.transformers.persist`)."""
        self.reset()
        if not state.get("initialized"):
            return
        self._exact_k, self._exact_v = state["exact_k"], state["exact_v"]
        for role in ("k", "v"):
            self.cold.pool(role).parts = {n.split(".", 1)[1]: t for n, t in state.items() if n.startswith(f"cold_{role}.")}
            self.cold.shared(role).update({n.split(".", 1)[1]: t for n, t in state.items() if n.startswith(f"shared_{role}.")})
        self.n_exact, self.n_cold, self.tail_valid = list(state["n_exact"]), list(state["n_cold"]), list(state["tail_valid"])
        self.seen = int(state["seen"])
        self.cold.fitted = list(state.get("fitted", [False] * len(self.n_exact)))

    # ------------------------------------------------------------------ bytes
    def memory_report(self) -> dict[str, int]:
        """Bytes held, from the tensors themselves (``numel * element_size``).

        Keys: ``cold_keys``, ``cold_values`` (every pool part), ``sinks``, ``warm``, ``hot``
        (the exact buffer split by the tokens each tier owns; the cold keys include the shared
        per-row compressor state), ``padding`` (exact-buffer
        slots of shorter rows), ``total_bytes``, ``dense_bytes`` (what a DynamicCache would
        hold for the same positions and dtype) and ``tokens`` (real tokens, all rows).
        """
        rep = {"cold_keys": self.cold.nbytes("k"), "cold_values": self.cold.nbytes("v")}
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
        return [t for t in (self.exact_k, self.exact_v) if t is not None] + self.cold.tensors()
