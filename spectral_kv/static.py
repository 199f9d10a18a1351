"""`StaticStorage`: one layer's frozen tiers, a decode step on fixed addresses (CUDA-graph capturable).

`TierManager.freeze(new_tokens)` hands its exact buffers to a `StaticStorage` and holds it until
`TierManager.thaw` takes them back (explicit state changes; ``TierManager.static`` says which):

* the exact buffer gets its largest width between decode steps,
  ``sink_tokens + hot_buffer_size + block_size + compress_lag``, and the cold pools room for
  the blocks ``new_tokens`` more tokens can fill;
* the per-row counts get device twins ``n_exact_t`` / ``n_cold_t`` (int32 ``[B]``).

A decode step is then `stage` (scatter the new token at ``n_exact_t``, bump it) plus attention
over the whole buffers with the device counts (`spectral_kv.view.AttendView`): no host sync, no
allocation that outlives the step, no shape that depends on the step. Everything that changes
the layout happens between steps, on the host, in `advance`: it takes the host counts, compresses
the blocks that became ready into their preallocated slots (`ColdTier.compress`, the same
warm -> cold move dynamic storage uses), shifts the exact buffer in place and refreshes the device
counters. Only when the cold pools run out of room do they grow (doubling), which changes their
addresses: `advance` then returns True and the tier manager bumps ``version``, so a CUDA graph
captured over the old ones is re-captured (`spectral_kv.graphs`).

With ``compress_lag = n > 0``, a ready block is compressed on a side CUDA stream (ordered after
the step that filled it) while the next ``n`` steps run; its tokens stay in the exact buffer and
are attended exactly until the block is swapped in, after the main stream waits for the side
stream's event. On the CPU there is no side stream: the block is compressed at once and swapped
in ``n`` steps later, so results are the same on both.

The host counts (``n_exact``, ``n_cold``: lists of int) stay the tier manager's; the methods
here that change them take them as arguments and update them in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import ColdTier
from .config import SpectralConfig

__all__ = ["StaticStorage", "side_stream", "static_width"]

# One side stream per device for the whole process: the caching allocator keeps blocks per
# stream, so a fresh stream per cache would cudaMalloc (a device-wide sync) at every compression.
_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """The process-wide background-compression stream of ``device``."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def static_width(config: SpectralConfig) -> int:
    """Exact-buffer width of a frozen layer: the most exact tokens a row holds between steps."""
    return config.sink_tokens + config.hot_buffer_size + config.block_size + config.compress_lag


@dataclass
class _Pending:
    rows: list[int]
    due: int  # the decode step (``steps``) at which the block is swapped in
    event: object  # torch.cuda.Event, or None on the CPU
    finite: torch.Tensor  # 0-d bool: the compressed tokens were finite


class StaticStorage:
    """The frozen buffers, device counters and background compressions of one layer.

    Parameters
    ----------
    config : SpectralConfig
    name : str
        Used in error messages.
    cold : ColdTier
        The layer's cold tier (shared with the tier manager; its pools get spare capacity).
    exact_k, exact_v : Tensor [B, H, W, D]
        The dynamic exact buffers (``W <= static_width``), padded here to the static width.
    n_exact, n_cold : list of int
        Host counts per row.
    new_tokens : int
        Decode tokens to reserve cold capacity for.
    """

    def __init__(self, config: SpectralConfig, name: str, cold: ColdTier, exact_k: torch.Tensor, exact_v: torch.Tensor,
                 n_exact: list[int], n_cold: list[int], new_tokens: int) -> None:
        self.config, self.name, self.cold = config, name, cold
        b, h, w, d = exact_k.shape
        width = static_width(config)
        if w > width:  # cannot happen: ready blocks are compressed at once (TierManager.freeze settles deferred ones)
            raise RuntimeError(f"{name}: exact tier holds {w} tokens, more than its static width {width}")
        pad = (b, h, width - w, d)
        self.exact_k = torch.cat((exact_k, exact_k.new_zeros(pad)), dim=2)
        self.exact_v = torch.cat((exact_v, exact_v.new_zeros(pad)), dim=2)
        self.pending: list[_Pending] = []
        self.steps = 0
        self.reserve(n_exact, n_cold, new_tokens)
        dev = self.exact_k.device
        self.n_exact_t = torch.tensor(n_exact, dtype=torch.int32, device=dev)
        self.n_cold_t = torch.tensor(n_cold, dtype=torch.int32, device=dev)

    # ------------------------------------------------------------------ layout
    def reserve(self, n_exact: list[int], n_cold: list[int], new_tokens: int) -> bool:
        """Cold room for ``new_tokens`` more tokens; True when a pool moved."""
        return self._reserve(n_exact, n_cold, max(n_cold) + -(-new_tokens // self.config.block_size) + 1)

    def _reserve(self, n_exact: list[int], n_cold: list[int], capacity: int) -> bool:
        if capacity > self.cold.k.n_blocks:
            self.commit(n_exact, n_cold, due_only=False)  # nothing may still write into pools about to be replaced
        b, h, _, d = self.exact_k.shape
        return self.cold.reserve(b, h, d, capacity, self.exact_k.device)

    def thaw(self, n_exact: list[int], n_cold: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Swap pending blocks in, release spare capacity; returns the dynamic exact buffers."""
        self.commit(n_exact, n_cold, due_only=False)
        width = max(n_exact)
        self.cold.narrow(max(n_cold))
        return self.exact_k[:, :, :width].clone(), self.exact_v[:, :, :width].clone()

    def wait(self) -> None:
        """Wait for side-stream work still writing into these buffers (before dropping them)."""
        for p in self.pending:
            if p.event is not None:
                torch.cuda.current_stream(self.exact_k.device).wait_event(p.event)

    # ------------------------------------------------------------------ decode step
    def stage(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per row (``k``, ``v`` [B, H, 1, D]) at its row's count (capturable)."""
        b, h, _, d = k.shape
        idx = self.n_exact_t.long()[:, None, None, None].expand(b, h, 1, d)
        self.exact_k.scatter_(2, idx, k)
        self.exact_v.scatter_(2, idx, v)
        self.n_exact_t.add_(1)

    def advance(self, n_exact: list[int], n_cold: list[int]) -> bool:
        """Host side of one decode step, run after it (``n_exact`` already counts the new token):
        blocks in and out. Returns True when a pool grew (its addresses moved)."""
        self.steps += 1
        self.commit(n_exact, n_cold, due_only=True)
        c = self.config
        busy = {r for p in self.pending for r in p.rows}
        ready = [
            r for r, n in enumerate(n_exact)
            if r not in busy and n - c.sink_tokens - c.hot_buffer_size >= c.block_size
        ]
        moved = False
        if ready:
            moved = self._launch(n_exact, n_cold, ready)
            self.commit(n_exact, n_cold, due_only=True)
        return moved

    def _launch(self, n_exact: list[int], n_cold: list[int], rows: list[int]) -> bool:
        moved = False
        if max(n_cold[r] for r in rows) + 1 > self.cold.k.n_blocks:
            moved = self._reserve(n_exact, n_cold, 2 * self.cold.k.n_blocks)
        plan = [1 if r in rows else 0 for r in range(len(n_exact))]
        # check=False: no host sync, which would drain the queue of replays meant to hide this.
        event = None
        if self.exact_k.is_cuda and self.config.compress_lag:
            side = side_stream(self.exact_k.device)
            side.wait_stream(torch.cuda.current_stream(self.exact_k.device))  # the block's tokens are written
            with torch.cuda.stream(side):
                finite = self.cold.compress(self.exact_k, self.exact_v, plan, n_cold, check=False)
                event = torch.cuda.Event()
                event.record(side)
        else:
            finite = self.cold.compress(self.exact_k, self.exact_v, plan, n_cold, check=False)
        self.pending.append(_Pending(rows, self.steps + self.config.compress_lag, event, finite))
        return moved

    def commit(self, n_exact: list[int], n_cold: list[int], due_only: bool) -> None:
        """Swap in the compressed blocks that are due (all with ``due_only=False``)."""
        keep = []
        for p in self.pending:
            if due_only and p.due > self.steps:
                keep.append(p)
                continue
            if p.event is not None:
                torch.cuda.current_stream(self.exact_k.device).wait_event(p.event)
            if not bool(p.finite):
                raise ValueError(
                    f"{self.name}: keys/values of batch row(s) {p.rows} hold NaN/Inf in a block about to be "
                    f"compressed; refusing to store a corrupted cold block (the model produced non-finite states)"
                )
            s, bs = self.config.sink_tokens, self.config.block_size
            for r in p.rows:
                n = n_exact[r]
                for buf in (self.exact_k, self.exact_v):
                    buf[r, :, s : n - bs] = buf[r, :, s + bs : n].clone()
                n_exact[r] -= bs
                n_cold[r] += 1
        if len(keep) != len(self.pending):
            self.pending = keep
            # Non-blocking host-to-device copies: ordered on the stream after the steps already
            # queued, without making the host wait for them.
            for host, dev in ((n_exact, self.n_exact_t), (n_cold, self.n_cold_t)):
                dev.copy_(torch.tensor(host, dtype=torch.int32), non_blocking=True)
