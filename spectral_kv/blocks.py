"""`ColdPool`: the compressed blocks of one role (keys or values) of one layer, pooled."""

from __future__ import annotations

import torch

__all__ = ["ColdPool"]


class ColdPool:
    """Named tensors ``[batch, kv_heads, n_blocks, *part_shape]``, one slot per cold block.

    Rows of a batch may hold different numbers of blocks (left-padded prompts fill their
    blocks at different steps); ``n_blocks`` is the widest row and the caller keeps each
    row's count. The pool grows by exactly the blocks written, so the bytes it holds are
    the bytes it needs (no spare capacity to inflate the memory report).
    """

    def __init__(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}

    @property
    def n_blocks(self) -> int:
        return next(iter(self.parts.values())).shape[2] if self.parts else 0

    def write(self, batch: int, rows: torch.Tensor, slots: torch.Tensor, blocks: dict[str, torch.Tensor]) -> None:
        """Store block ``i`` of ``blocks`` at ``(rows[i], :, slots[i])``, growing the pool as needed.

        Parameters
        ----------
        batch : int
            Rows of the pool (used when the first blocks arrive).
        rows, slots : Tensor [P] int64
        blocks : dict of Tensor [P, kv_heads, *part_shape]
        """
        if not self.parts:
            self.parts = {n: t.new_zeros(batch, t.shape[1], 0, *t.shape[2:]) for n, t in blocks.items()}
        needed = int(slots.max()) + 1
        for name, new in blocks.items():
            pool = self.parts[name]
            if needed > pool.shape[2]:
                grow = pool.new_zeros(pool.shape[0], pool.shape[1], needed - pool.shape[2], *pool.shape[3:])
                pool = torch.cat((pool, grow), dim=2)
            pool[rows, :, slots] = new.to(pool.dtype)
            self.parts[name] = pool

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep / reorder / repeat batch rows (beam search, batch selection)."""
        self.parts = {name: t.index_select(0, index.to(t.device)) for name, t in self.parts.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def clear(self) -> None:
        self.parts = {}
