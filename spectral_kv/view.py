"""`AttendView`: everything one attention call reads from one layer, in one object.

`TierManager.view` builds it; `AttentionStrategy.attend(q, view, scaling)` reads it. The view
already includes the staged (new) tokens at the end of the exact buffer, so a strategy never
concatenates or merges masks itself. It comes in two forms:

* dynamic storage: validity as masks (``exact_mask``, ``cold_valid``), ``None`` meaning
  "everything is visible", decided on the host from the host-side counts;
* static storage (a frozen cache, one decode token): validity as int32 device counts
  (``n_exact``, ``n_cold``), so nothing in a decode step depends on the host and the step can
  be captured in a CUDA graph.

`masks` and `counts` convert between the two with tensor ops only (no host sync).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

__all__ = ["AttendView", "stage_dynamic", "new_tokens_real"]

# (weakref to a mask, its _version, tq, answer): transformers hands every layer of a forward
# pass the same mask tensor, so its last row is read on the host once per step, not once per
# layer (each read is a host sync on a GPU). A weak reference: a prefill mask [B, 1, T, T] may
# be large and must not outlive the step.
_LAST_MASK_CHECK: tuple = (None, -1, -1, False)


@dataclass
class AttendView:
    """What attention reads from one layer, the staged tokens included.

    Attributes
    ----------
    exact_k, exact_v : Tensor [B, H, W, D]
        Exact tokens (sinks, warm, hot, then the staged new tokens), right-padded per row.
    cold_k, cold_v : dict of Tensor [B, H, NB, ...]
        The compressors' parts of ``NB`` cold blocks per row (empty dict: no cold block).
    shared_k, shared_v : dict of Tensor [B, H, ...]
        Per-row shared compressor state (`Compressor.shared_specs`); empty for stateless
        compressors. `shared_for_blocks` gives the form compressor methods take.
    exact_mask : Tensor [B, 1, Tq, W] bool or None
        Dynamic storage: True where query ``i`` may attend exact token ``j``; None: all
        (``Tq`` may be 1 and broadcast when the view holds no staged tokens).
    cold_valid : Tensor [B, NB] bool or None
        Dynamic storage: which blocks of each row are real; None: all.
    n_exact, n_cold : Tensor [B] int32 or None
        Static storage: row ``b`` holds its first ``n_exact[b]`` exact tokens and first
        ``n_cold[b]`` blocks, every one visible to every query.
    cold_in_use : int or None
        Static storage: the blocks the widest row held when the view was built (host side). A
        launch-planning hint for kernels (static pools have spare slots for the blocks still to
        come), never validity; None: the pools' ``NB``.
    """

    exact_k: torch.Tensor
    exact_v: torch.Tensor
    cold_k: dict[str, torch.Tensor] = field(default_factory=dict)
    cold_v: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_k: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_v: dict[str, torch.Tensor] = field(default_factory=dict)
    exact_mask: torch.Tensor | None = None
    cold_valid: torch.Tensor | None = None
    n_exact: torch.Tensor | None = None
    n_cold: torch.Tensor | None = None
    cold_in_use: int | None = None

    @property
    def static(self) -> bool:
        """Validity given as device counts (static storage) rather than masks."""
        return self.n_exact is not None

    @property
    def n_cold_blocks(self) -> int:
        return next(iter(self.cold_k.values())).shape[2] if self.cold_k else 0

    @property
    def exact_prefix(self) -> bool:
        """Every query sees a prefix of each row's exact buffer and every valid cold block, so
        per-row counts describe validity (what `counts` needs). Decided without a host sync:
        static storage keeps counts by construction; in the dynamic form the tier manager
        leaves ``exact_mask`` None exactly when every row's exact tokens fill the buffer and
        every query sees all of them (a decode step of an unpadded batch), from host counts."""
        return self.static or self.exact_mask is None

    def masks(self, tq: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(cold_valid [B, NB] bool or None, exact_mask [B, 1, tq, W] bool or None)``.

        Static views build them from the counts with tensor ops only (capturable, fixed shapes).
        """
        if not self.static:
            return self.cold_valid, self.exact_mask
        b, width, dev = self.exact_k.shape[0], self.exact_k.shape[2], self.exact_k.device
        exact_mask = (torch.arange(width, device=dev)[None, :] < self.n_exact[:, None])[:, None, None, :]
        exact_mask = exact_mask.expand(b, 1, tq, width)
        cold_valid = None
        if self.cold_k:
            cold_valid = torch.arange(self.n_cold_blocks, device=dev)[None, :] < self.n_cold[:, None]
        return cold_valid, exact_mask

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(n_cold, n_exact)``, int32 ``[B]`` on the device (what kernels take).

        Raises ValueError when validity is not a per-row prefix (`exact_prefix` is False:
        padded rows or a causal chunk of several queries), which counts cannot express.
        """
        if self.static:
            return self.n_cold, self.n_exact
        if not self.exact_prefix:
            raise ValueError("AttendView.counts: the exact tokens are masked (padded rows or a causal chunk), not a prefix")
        b, width, dev = self.exact_k.shape[0], self.exact_k.shape[2], self.exact_k.device
        if self.cold_valid is not None:
            n_cold = self.cold_valid.sum(1).to(torch.int32)
        else:
            n_cold = torch.full((b,), self.n_cold_blocks, dtype=torch.int32, device=dev)
        return n_cold, torch.full((b,), width, dtype=torch.int32, device=dev)

    def shared_for_blocks(self, role: str) -> dict[str, torch.Tensor] | None:
        """The shared state of ``role`` ("k" or "v") as compressor methods take it with the
        cold parts: ``[B, H, 1, ...]`` (the block axis broadcast), or None when stateless."""
        shared = self.shared_k if role == "k" else self.shared_v
        return {name: t.unsqueeze(2) for name, t in shared.items()} or None


def new_tokens_real(mask: torch.Tensor | None, tq: int) -> bool:
    """Whether every row's last ``tq`` positions are real tokens (not padding) in ``mask``.

    ``mask`` is bool [B, 1, Tq, L] as `stage_dynamic` takes it (None: no padding); its last
    query row marks the real keys. The answer is remembered for the last mask asked about
    (identity and in-place version), which every layer of a step shares.
    """
    global _LAST_MASK_CHECK
    if mask is None:
        return True
    if mask.is_inference():
        # inference tensors track no version counter: an in-place edit could not be seen, so
        # no memo (one read per layer under torch.inference_mode)
        return bool(mask[:, 0, -1, -tq:].all())
    ref, version, last_tq, answer = _LAST_MASK_CHECK
    if ref is not None and ref() is mask and version == mask._version and last_tq == tq:
        return answer
    answer = bool(mask[:, 0, -1, -tq:].all())
    _LAST_MASK_CHECK = (weakref.ref(mask), mask._version, tq, answer)
    return answer


def stage_dynamic(
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    exact_valid: torch.Tensor | None,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The exact buffer plus the staged tokens, and the mask over both (dynamic storage).

    Parameters
    ----------
    exact_k, exact_v : Tensor [B, H, W, D] (W may be 0)
    exact_valid : Tensor [B, W] bool or None (None: every slot is a real token)
    key, value : Tensor [B, H, Tq, D]
        The staged tokens.
    mask : Tensor [B, 1, Tq, L] bool or None
        transformers' mask in its (padded) positions, already checked to cover ``L`` positions;
        its last ``Tq`` columns give causality and padding among the new tokens. None: causal.

    Returns
    -------
    exact_k, exact_v : Tensor [B, H, W + Tq, D]
    exact_mask : Tensor [B, 1, Tq, W + Tq] bool or None
    valid_new : Tensor [B, Tq] bool or None
        Which staged tokens are real (the mask's last row: the last query sees every real key).
    """
    b, _, tq, _ = key.shape
    if mask is not None:
        # A decode query is the newest token and always sees itself, so it needs no chunk
        # mask; leaving it None keeps exact_mask None in unpadded batches, which lets the
        # fused kernel run without a host-side mask check (a sync and a graph break).
        chunk_mask = mask[:, :1, :, -tq:].expand(b, 1, tq, tq) if tq > 1 else None
        valid_new = mask[:, 0, -1, -tq:].expand(b, tq)
    else:
        chunk_mask = None
        if tq > 1:
            chunk_mask = torch.ones(tq, tq, dtype=torch.bool, device=key.device).tril()[None, None].expand(b, 1, tq, tq)
        valid_new = None
    width = exact_k.shape[2]
    if not width:
        return key, value, chunk_mask, valid_new
    exact_k = torch.cat((exact_k, key), dim=2)
    exact_v = torch.cat((exact_v, value), dim=2)
    exact_mask = None
    if exact_valid is not None or chunk_mask is not None:
        past = (
            torch.ones(b, 1, tq, width, dtype=torch.bool, device=key.device)
            if exact_valid is None
            else exact_valid[:, None, None, :].expand(b, 1, tq, width)
        )
        new = chunk_mask if chunk_mask is not None else torch.ones(b, 1, tq, tq, dtype=torch.bool, device=key.device)
        exact_mask = torch.cat((past, new), dim=-1)
    return exact_k, exact_v, exact_mask, valid_new
