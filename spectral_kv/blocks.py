"""The cold tier of one layer: pooled compressed blocks, per-row shared compressor state, and
the one warm -> cold move (`ColdTier.compress`) that dynamic and static storage both use.

* `ColdPool`: the compressed blocks of one role (keys or values), ``[B, H, NB, ...]`` per part.
* `ColdTier`: both pools, the compressors, and the per-row shared state a compressor may
  declare (`Compressor.shared_specs`): fitted once per row (`Compressor.fit`) at that row's
  first compression, then handed to every later call on that row's blocks.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .compressors.base import Compressor
from .config import SpectralConfig

__all__ = ["ColdPool", "ColdTier", "MAX_BLOCKS_PER_CALL"]

# Blocks compressed per compressor call: bounds the transient float32 copy made while a
# long prompt is compressed at prefill (64 blocks x 512 tokens per head).
MAX_BLOCKS_PER_CALL = 64


class ColdPool:
    """Named tensors ``[batch, kv_heads, n_blocks, *part_shape]``, one slot per cold block.

    Rows of a batch may hold different numbers of blocks (left-padded prompts fill their
    blocks at different steps); ``n_blocks`` is the widest row and the caller keeps each
    row's count. A dynamic pool grows by exactly the blocks written, so the bytes it holds
    are the bytes it needs; static storage (`reserve`) holds spare slots, and the memory
    report counts them.
    """

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}

    @property
    def n_blocks(self) -> int:
        return next(iter(self.parts.values())).shape[2] if self.parts else 0

    def write(
        self, batch: int, rows: torch.Tensor, slots: torch.Tensor, blocks: dict[str, torch.Tensor], needed: int | None = None
    ) -> None:
        """Store block ``i`` of ``blocks`` at ``(rows[i], :, slots[i])``, growing the pool as needed.

        Parameters
        ----------
        batch : int
            Rows of the pool (used when the first blocks arrive).
        rows, slots : Tensor [P] int64
        blocks : dict of Tensor [P, kv_heads, *part_shape]
        needed : int, optional
            ``max(slots) + 1`` when the caller knows it (saves a host sync).
        """
        if not self.parts:
            self.parts = {n: t.new_zeros(batch, t.shape[1], 0, *t.shape[2:]) for n, t in blocks.items()}
        needed = int(slots.max()) + 1 if needed is None else needed
        for name, new in blocks.items():
            pool = self.parts[name]
            if needed > pool.shape[2]:
                grow = pool.new_zeros(pool.shape[0], pool.shape[1], needed - pool.shape[2], *pool.shape[3:])
                pool = torch.cat((pool, grow), dim=2)
            pool[rows, :, slots] = new.to(pool.dtype)
            self.parts[name] = pool

    def reserve(self, batch: int, heads: int, capacity: int, specs: dict, device: torch.device) -> None:
        """Give the pool room for ``capacity`` blocks per row (never shrinks; new slots are zeros).

        ``specs`` maps part names to ``(per-block shape, dtype)`` (`Compressor.part_specs`);
        used only while the pool is still empty. Used by static storage, which preallocates
        so that decode steps never reallocate (`spectral_kv.static`).
        """
        if not self.parts:
            self.parts = {n: torch.zeros(batch, heads, 0, *shape, dtype=dt, device=device) for n, (shape, dt) in specs.items()}
        for name, pool in self.parts.items():
            if capacity > pool.shape[2]:
                grow = pool.new_zeros(pool.shape[0], pool.shape[1], capacity - pool.shape[2], *pool.shape[3:])
                self.parts[name] = torch.cat((pool, grow), dim=2)

    def narrow(self, n_blocks: int) -> None:
        """Drop the slots past ``n_blocks`` (spare capacity), keeping the blocks before them."""
        self.parts = {name: t[:, :, :n_blocks].clone() for name, t in self.parts.items()}
        if n_blocks == 0:
            self.parts = {}

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, batch selection)."""
        self.parts = {name: t.index_select(0, index.to(t.device)) for name, t in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def clear(self) -> None:
        self.parts = {}


class ColdTier:
    """The cold side of one layer: key / value pools, their compressors and per-row shared state.

    Parameters
    ----------
    config : SpectralConfig
    key_compressor, value_compressor : Compressor
    name : str
        Used in error messages (e.g. ``"layer 3"``).

    Attributes
    ----------
    k, v : ColdPool
    shared_k, shared_v : dict of Tensor [B, H, ...]
        Per-row shared state of each role (empty for stateless compressors); allocated at the
        first compression (or `reserve`) and written in place afterwards, so its addresses stay
        fixed under static storage.
    fitted : list of bool
        Per row: its shared state has been fitted (always False for stateless compressors).
    """

    def __init__(self, config: SpectralConfig, key_compressor: Compressor, value_compressor: Compressor, name: str) -> None:
        self.config = config
        self.name = name
        self.roles = (("k", key_compressor), ("v", value_compressor))
        self.clear()

    def clear(self) -> None:
        self.k, self.v = ColdPool(), ColdPool()
        self.shared_k: dict[str, torch.Tensor] = {}
        self.shared_v: dict[str, torch.Tensor] = {}
        self.fitted: list[bool] = []

    def pool(self, role: str) -> ColdPool:
        return self.k if role == "k" else self.v

    def shared(self, role: str) -> dict[str, torch.Tensor]:
        return self.shared_k if role == "k" else self.shared_v

    def stateful(self, head_dim: int) -> bool:
        """Some compressor declares shared per-row state (`Compressor.shared_specs`)."""
        return any(comp.shared_specs(head_dim) for _, comp in self.roles)

    # ------------------------------------------------------------------ warm -> cold
    def compress(
        self,
        exact_k: torch.Tensor,
        exact_v: torch.Tensor,
        ready: list[int],
        n_cold: list[int],
        check: bool = True,
        per_call: int | None = None,
    ) -> torch.Tensor:
        """Compress the first ``ready[row]`` blocks after the sinks of each row into its next slots.

        Parameters
        ----------
        exact_k, exact_v : Tensor [B, H, W, D]
            The exact buffer; block ``j`` of row ``r`` is ``[r, :, s + j*bs : s + (j+1)*bs]``.
        ready : list of int
            Blocks to compress per row (host plan).
        n_cold : list of int
            Blocks each row already holds: block ``j`` goes to slot ``n_cold[row] + j``.
        check : bool
            Raise at once (a host sync) if a block holds NaN/Inf. Without, nothing syncs (it can
            run on a side stream) and the caller reads the returned flag later.
        per_call : int or None
            Blocks per compressor call (None: all in one call).

        Returns
        -------
        Tensor, 0-d bool: every compressed token was finite.
        """
        b = exact_k.shape[0]
        if len(self.fitted) != b:
            self.fitted = (self.fitted + [False] * b)[:b]
        fitting = [r for r, m in enumerate(ready) if m and not self.fitted[r]] if self.stateful(exact_k.shape[3]) else []
        self._fit(exact_k, exact_v, {r: ready[r] for r in fitting})
        pairs = [(row, j) for row, m in enumerate(ready) for j in range(m)]
        step = per_call or len(pairs)
        finite = [self._compress_pairs(exact_k, exact_v, pairs[i : i + step], n_cold, check) for i in range(0, len(pairs), step)]
        for r in fitting:  # only once every block compressed: a refused block leaves the row to re-fit
            self.fitted[r] = True
        return torch.stack(finite).all()

    def _fit(self, exact_k: torch.Tensor, exact_v: torch.Tensor, blocks: dict[int, int]) -> None:
        """`Compressor.fit` on all blocks a row compresses now (rows grouped by block count)."""
        if not blocks:
            return
        s, bs = self.config.sink_tokens, self.config.block_size
        b, h, _, d = exact_k.shape
        groups: dict[int, list[int]] = defaultdict(list)
        for r, m in blocks.items():
            groups[m].append(r)
        for (role, comp), exact in zip(self.roles, (exact_k, exact_v)):
            specs = comp.shared_specs(d)
            if not specs:
                continue
            shared = self.shared(role)
            if not shared:
                shared.update({n: torch.zeros(b, h, *shape, dtype=dt, device=exact.device) for n, (shape, dt) in specs.items()})
            for m, rows in groups.items():
                x = torch.stack([exact[r, :, s : s + m * bs] for r in rows]).float()  # [P, H, L, D]
                fitted = comp.fit(x)
                idx = torch.tensor(rows, device=exact.device)
                for n, t in fitted.items():
                    shared[n][idx] = t.to(shared[n].dtype)

    def _compress_pairs(self, exact_k, exact_v, pairs: list[tuple[int, int]], n_cold: list[int], check: bool) -> torch.Tensor:
        s, bs = self.config.sink_tokens, self.config.block_size
        b, h, _, d = exact_k.shape
        dev = exact_k.device
        host_slots = [n_cold[row] + j for row, j in pairs]
        rows = torch.tensor([row for row, _ in pairs]).to(dev, non_blocking=True)
        slots = torch.tensor(host_slots).to(dev, non_blocking=True)
        finite = []
        for (role, comp), exact in zip(self.roles, (exact_k, exact_v)):
            blocks = torch.stack([exact[row, :, s + j * bs : s + (j + 1) * bs] for row, j in pairs])
            finite.append(torch.isfinite(blocks).all())
            if check and not bool(finite[-1]):
                bad = sorted({row for (row, j), blk in zip(pairs, blocks) if not bool(torch.isfinite(blk).all())})
                raise ValueError(
                    f"{self.name}: {comp.role} of batch row(s) {bad} hold NaN/Inf in a block about to be "
                    f"compressed; refusing to store a corrupted cold block (the model produced non-finite "
                    f"{comp.role})"
                )
            x = blocks.reshape(len(pairs) * h, bs, d).float()
            shared = self.shared(role)
            if shared:  # each block gets its row's state: [P * H, ...]
                parts = comp.compress(x, {n: t[rows].reshape(len(pairs) * h, *t.shape[2:]) for n, t in shared.items()})
            else:  # stateless compressors are called as they always were
                parts = comp.compress(x)
            parts = {name: t.reshape(len(pairs), h, *t.shape[1:]) for name, t in parts.items()}
            self.pool(role).write(b, rows, slots, parts, needed=max(host_slots) + 1)
        return torch.stack(finite).all()

    # ------------------------------------------------------------------ layout
    def reserve(self, batch: int, heads: int, head_dim: int, capacity: int, device: torch.device) -> bool:
        """Room for ``capacity`` blocks per row and the shared state allocated (static storage).
        Returns True when some tensor moved (a CUDA graph over the old ones is stale)."""
        moved = False
        for role, comp in self.roles:
            pool = self.pool(role)
            before = pool.parts and next(iter(pool.parts.values())).data_ptr()
            pool.reserve(batch, heads, capacity, comp.part_specs(head_dim), device)
            moved |= next(iter(pool.parts.values())).data_ptr() != before
            shared = self.shared(role)
            if not shared and comp.shared_specs(head_dim):
                specs = comp.shared_specs(head_dim).items()
                shared.update({n: torch.zeros(batch, heads, *shape, dtype=dt, device=device) for n, (shape, dt) in specs})
                moved = True
        if len(self.fitted) != batch:
            self.fitted = (self.fitted + [False] * batch)[:batch]
        return moved

    def narrow(self, n_blocks: int) -> None:
        """Drop spare slots past ``n_blocks``; with no block left, the shared state goes too."""
        self.k.narrow(n_blocks)
        self.v.narrow(n_blocks)
        if n_blocks == 0:
            self.shared_k, self.shared_v = {}, {}
            self.fitted = [False] * len(self.fitted)

    def select_rows(self, index: torch.Tensor, host: list[int]) -> None:
        """Keep / reorder / repeat batch rows (``index`` int64 [B'] on the device, ``host`` its list)."""
        self.k.select_rows(index)
        self.v.select_rows(index)
        for shared in (self.shared_k, self.shared_v):
            for n, t in shared.items():
                shared[n] = t.index_select(0, index.to(t.device))
        self.fitted = [self.fitted[i] for i in host] if self.fitted else []

    # ------------------------------------------------------------------ bytes
    def nbytes(self, role: str) -> int:
        """Bytes held for ``role``: every pool part plus the shared state (cold bytes)."""
        shared = sum(t.numel() * t.element_size() for t in self.shared(role).values())
        return self.pool(role).nbytes() + shared

    def tensors(self) -> list[torch.Tensor]:
        return [*self.k.parts.values(), *self.v.parts.values(), *self.shared_k.values(), *self.shared_v.values()]
