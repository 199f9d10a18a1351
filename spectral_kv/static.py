"""Static storage for one layer's tiers: a decode step on fixed addresses, capturable in a CUDA graph.

`TierManager.freeze(new_tokens)` switches a layer from growing tensors to preallocated ones:

* the exact buffer gets its largest width between decode steps,
  ``sink_tokens + hot_buffer_size + block_size + compress_lag``, and the cold pools room for
  the blocks ``new_tokens`` more tokens can fill;
* the per-row counts get device twins ``n_exact_t`` / ``n_cold_t`` (int32 ``[B]``).

A decode step is then `append_static` (scatter the new token at ``n_exact_t``, bump it)
plus attention over the whole buffers masked by the counters: no host sync, no allocation
that outlives the step, no shape that depends on the step. Everything that changes the
layout happens between steps, on the host, in `advance`: it updates the host counts,
compresses the blocks that became ready into their preallocated slots, shifts the exact
buffer in place and refreshes the device counters. Only when the cold pools run out of room
do they grow (doubling), which changes their addresses: ``version`` is bumped so a CUDA
graph captured over the old ones is re-captured (`spectral_kv.graphs`).

With ``compress_lag = n > 0``, a ready block is compressed on a side CUDA stream (ordered
after the step that filled it) while the next ``n`` steps run; its tokens stay in the exact
buffer and are attended exactly until the block is swapped in, after the main stream waits
for the side stream's event. On the CPU there is no side stream: the block is compressed at
once and swapped in ``n`` steps later, so results are the same on both.

Any other operation (a prefill chunk, crop, batch reordering, restore, save) first calls
`thaw`, which waits for pending blocks and narrows the tensors back to a dynamic layout.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

__all__ = ["StaticTiersMixin", "deferred_advance", "advance_deferred"]

_state = threading.local()
# One side stream per device for the whole process: the caching allocator keeps blocks per
# stream, so a fresh stream per cache would cudaMalloc (a device-wide sync) at every compression.
_SIDE_STREAMS: dict = {}


def side_stream(device: torch.device):
    """The process-wide background-compression stream of ``device``."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


@contextlib.contextmanager
def deferred_advance():
    """While active, static decode steps leave `advance` to the caller (a CUDA-graph driver:
    the Python of a captured step runs once, its kernels at every replay)."""
    previous = getattr(_state, "deferred", False)
    _state.deferred = True
    try:
        yield
    finally:
        _state.deferred = previous


def advance_deferred() -> bool:
    return getattr(_state, "deferred", False)


@dataclass
class _Pending:
    rows: list[int]
    due: int  # the decode step (``steps``) at which the block is swapped in
    event: object  # torch.cuda.Event, or None on the CPU
    finite: torch.Tensor  # 0-d bool: the compressed tokens were finite


class StaticTiersMixin:
    """The static-storage half of `spectral_kv.tiers.TierManager` (see the module docstring)."""

    static: bool = False
    version: int = 0  # bumped whenever static buffers are (re)allocated or released

    def _init_static(self) -> None:
        self.static = False
        self.n_exact_t: torch.Tensor | None = None
        self.n_cold_t: torch.Tensor | None = None
        self.pending: list[_Pending] = []
        self.steps = 0

    # ------------------------------------------------------------------ layout
    def static_width(self) -> int:
        c = self.config
        return c.sink_tokens + c.hot_buffer_size + c.block_size + c.compress_lag

    def freeze(self, new_tokens: int) -> None:
        """Preallocate for ``new_tokens`` more decode tokens and switch to static decode steps."""
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 0:
            raise ValueError(f"{self.name}: freeze(new_tokens) needs a non-negative int, got {new_tokens!r}")
        if not self.initialized:
            raise RuntimeError(f"{self.name}: freeze() needs a prefilled cache (run the prompt first)")
        if self.static:
            self._reserve_cold(max(self.n_cold) + -(-new_tokens // self.config.block_size) + 1)
            return
        b, h, w, d = self.exact_k.shape
        width = self.static_width()
        if w > width:  # cannot happen after an update: ready blocks are compressed at once
            raise RuntimeError(f"{self.name}: exact tier holds {w} tokens, more than its static width {width}")
        pad = (b, h, width - w, d)
        self.exact_k = torch.cat((self.exact_k, self.exact_k.new_zeros(pad)), dim=2)
        self.exact_v = torch.cat((self.exact_v, self.exact_v.new_zeros(pad)), dim=2)
        self._reserve_cold(max(self.n_cold) + -(-new_tokens // self.config.block_size) + 1)
        dev = self.exact_k.device
        self.n_exact_t = torch.tensor(self.n_exact, dtype=torch.int32, device=dev)
        self.n_cold_t = torch.tensor(self.n_cold, dtype=torch.int32, device=dev)
        self.static = True
        self.version += 1

    def _reserve_cold(self, capacity: int) -> None:
        if capacity > self.cold_k.n_blocks:
            self._commit(due_only=False)  # nothing may still write into pools about to be replaced
        b, h, _, d = self.exact_k.shape
        for pool, comp in ((self.cold_k, self.key_compressor), (self.cold_v, self.value_compressor)):
            before = pool.parts and next(iter(pool.parts.values())).data_ptr()
            pool.reserve(b, h, capacity, comp.part_specs(d), self.exact_k.device)
            if next(iter(pool.parts.values())).data_ptr() != before:
                self.version += 1

    def thaw(self) -> None:
        """Back to the dynamic layout (pending blocks swapped in, spare capacity released)."""
        if not self.static:
            return
        self._commit(due_only=False)
        width = max(self.n_exact)
        self.exact_k = self.exact_k[:, :, :width].clone()
        self.exact_v = self.exact_v[:, :, :width].clone()
        self.cold_k.narrow(max(self.n_cold))
        self.cold_v.narrow(max(self.n_cold))
        self.static = False
        self.n_exact_t = self.n_cold_t = None
        self.version += 1

    # ------------------------------------------------------------------ decode step
    def append_static(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one new token per row at its row's count (device-side; capturable)."""
        b, h, _, d = k.shape
        idx = self.n_exact_t.long()[:, None, None, None].expand(b, h, 1, d)
        self.exact_k.scatter_(2, idx, k)
        self.exact_v.scatter_(2, idx, v)
        self.n_exact_t.add_(1)

    def advance(self) -> None:
        """Host side of one static decode step, run after it: counts, then blocks in and out."""
        self.n_exact = [n + 1 for n in self.n_exact]
        self.tail_valid = [n + 1 for n in self.tail_valid]
        self.seen += 1
        self.steps += 1
        self._commit(due_only=True)
        c = self.config
        busy = {r for p in self.pending for r in p.rows}
        ready = [
            r for r, n in enumerate(self.n_exact)
            if r not in busy and n - c.sink_tokens - c.hot_buffer_size >= c.block_size
        ]
        if ready:
            self._launch(ready)
            self._commit(due_only=True)

    def _launch(self, rows: list[int]) -> None:
        if max(self.n_cold[r] for r in rows) + 1 > self.cold_k.n_blocks:
            self._reserve_cold(2 * self.cold_k.n_blocks)
        # check=False: no host sync, which would drain the queue of replays meant to hide this.
        event = None
        if self.exact_k.is_cuda and self.config.compress_lag:
            side = side_stream(self.exact_k.device)
            side.wait_stream(torch.cuda.current_stream(self.exact_k.device))  # the block's tokens are written
            with torch.cuda.stream(side):
                finite = self._compress_pairs([(r, 0) for r in rows], check=False)
                event = torch.cuda.Event()
                event.record(side)
        else:
            finite = self._compress_pairs([(r, 0) for r in rows], check=False)
        self.pending.append(_Pending(rows, self.steps + self.config.compress_lag, event, finite))

    def _commit(self, due_only: bool) -> None:
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
                n = self.n_exact[r]
                for buf in (self.exact_k, self.exact_v):
                    buf[r, :, s : n - bs] = buf[r, :, s + bs : n].clone()
                self.n_exact[r] -= bs
                self.n_cold[r] += 1
        if len(keep) != len(self.pending):
            self.pending = keep
            # Non-blocking host-to-device copies: ordered on the stream after the steps already
            # queued, without making the host wait for them.
            for host, dev in ((self.n_exact, self.n_exact_t), (self.n_cold, self.n_cold_t)):
                dev.copy_(torch.tensor(host, dtype=torch.int32), non_blocking=True)

    def drain(self) -> None:
        """Wait for blocks still being compressed and swap them in (before anything else runs)."""
        if self.pending:
            self._commit(due_only=False)
