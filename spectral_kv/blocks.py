"""`ColdPool`: the compressed blocks of one role (keys or values) of one layer, pooled."""

from __future__ import annotations

import torch

__all__ = ["ColdPool"]


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
