"""`spectral`: attend in the compressed space, never materializing cold K/V."""

from __future__ import annotations

import torch

from .base import AttentionStrategy, register_attention

__all__ = ["SpectralAttention"]


def _per_head(basis: torch.Tensor | None) -> torch.Tensor | None:
    # A per-row shared basis comes with the parts' block axis as 1: [B, H, 1, r, D] -> [B, H, r, D].
    return basis.squeeze(2) if basis is not None and basis.dim() == 5 else basis


@register_attention("spectral")
class SpectralAttention(AttentionStrategy):
    """Cold scores as ``((q @ B_kᵀ) * s_k) @ C_kᵀ``; one float32 softmax jointly with the exact
    tokens; cold values as ``((p @ C_v) * s_v) @ B_v``. GQA folds the ``G`` query heads of a
    KV head into the query axis, so K/V are never repeated.

    A compressor whose basis is shared by all blocks (``shared_basis``, e.g. ``hadamard``'s
    rotation) gets it applied once per step: ``q @ Bᵀ`` once for the keys, and for the values
    ``p @ C_v`` summed over every block before one ``@ B``. Keys and values choose
    independently; a per-block basis (SVD layouts) is applied block by block.

    This is the readable torch version (the reference the fused kernel is tested against);
    it reads the compressed bytes a few times, so on GPUs it is slower than SDPA.
    """

    needs = "factored (coefficients @ basis)"

    @classmethod
    def serves(cls, key_compressor, value_compressor) -> bool:
        return key_compressor.factored and value_compressor.factored

    def __init__(self, config, key_compressor, value_compressor):
        super().__init__(config, key_compressor, value_compressor)
        for comp in (key_compressor, value_compressor):
            if not comp.factored:
                raise ValueError(f"attention={self.name!r} needs a factored compressor, got {type(comp).__name__}")

    def attend(self, q, view, scaling):
        b, hq, tq, d = q.shape
        exact_k, exact_v, cold_k, cold_v = view.exact_k, view.exact_v, view.cold_k, view.cold_v
        cold_valid, exact_mask = view.masks(tq)
        kc, vc = self.key_compressor, self.value_compressor
        # Stateless compressors are called without ``shared`` (as they always were).
        sk, sv = view.shared_for_blocks("k"), view.shared_for_blocks("v")
        ks, vs = ((sk,) if sk else ()), ((sv,) if sv else ())
        h = exact_k.shape[1]
        g = hq // h
        # [B, H, G*Tq, D]: row r of KV head h is query head h*G + r // Tq at position r % Tq.
        qf = q.float().reshape(b, h, g * tq, d)
        # Scores are kept keys-major, [B, H, L, GTq], and every cold product is a batched matmul
        # of contiguous operands whose block axis NB only ever needs splitting or merging with
        # a neighbour that is contiguous with it. Under torch.compile(dynamic=True) that keeps NB
        # a free symbol: einsum's planner, broadcasting matmuls and reshapes of transposed
        # views all guard on NB == 1, i.e. recompile when the cache grows its second block.

        def fold(mask):  # [B, 1, Tq, L] -> [B, 1, L, G*Tq]
            m = mask.unsqueeze(2).expand(b, 1, g, tq, mask.shape[-1]).reshape(b, 1, g * tq, mask.shape[-1])
            return m.transpose(-1, -2)

        exact_scores = (exact_k.float() @ qf.transpose(-1, -2)) * scaling  # [B, H, Te, GTq]
        if exact_mask is not None:
            exact_scores = exact_scores.masked_fill(~fold(exact_mask), float("-inf"))
        # One softmax over cold and exact keys, computed from the two score blocks separately
        # (a concatenate-then-slice would make p_cold a strided view, see above).
        if exact_scores.shape[-2]:
            m = exact_scores.amax(dim=-2, keepdim=True)  # [B, H, 1, GTq]
        else:
            m = exact_scores.new_full((b, h, 1, g * tq), float("-inf"))
        nb = 0
        if cold_k:
            ck = kc.coefficients(cold_k, *ks)  # [B, H, NB, T, rk]
            nb, t, rk = ck.shape[2], ck.shape[3], ck.shape[4]
            shared_k = _per_head(kc.shared_basis(cold_k, *ks))  # [rk, D], [B, H, rk, D] or None
            if shared_k is not None:  # one basis for all blocks: rotate q once, not per block
                qb = qf @ shared_k.transpose(-1, -2)  # [B, H, GTq, rk]
                cold_scores = ck.reshape(b, h, nb * t, rk) @ qb.transpose(-1, -2)  # [B, H, NB*T, GTq]
            else:
                qb = kc.basis(cold_k, *ks).reshape(b, h, nb * rk, d) @ qf.transpose(-1, -2)  # [B, H, NB*rk, GTq]
                cold_scores = (ck @ qb.reshape(b, h, nb, rk, g * tq)).reshape(b, h, nb * t, g * tq)
            cold_scores = cold_scores * scaling
            if cold_valid is not None:
                keep = cold_valid[:, None, :, None, None].expand(b, 1, nb, t, 1).reshape(b, 1, nb * t, 1)
                cold_scores = cold_scores.masked_fill(~keep, float("-inf"))
            m = torch.maximum(m, cold_scores.amax(dim=-2, keepdim=True))
        seen = torch.isfinite(m)
        m = torch.where(seen, m, torch.zeros_like(m))
        p = torch.exp(exact_scores - m)
        denom = p.sum(dim=-2, keepdim=True)
        out = p.transpose(-1, -2) @ exact_v.float()  # [B, H, GTq, D]
        if nb:
            cv = vc.coefficients(cold_v, *vs)  # [B, H, NB, T, rv]
            rv = cv.shape[-1]
            p_cold = torch.exp(cold_scores - m)
            denom = denom + p_cold.sum(dim=-2, keepdim=True)
            shared_v = _per_head(vc.shared_basis(cold_v, *vs))  # [rv, D], [B, H, rv, D] or None
            if shared_v is not None:  # sum over all blocks in coefficient space, then one @ basis
                pc = p_cold.transpose(-1, -2) @ cv.reshape(b, h, nb * t, rv)  # [B, H, GTq, rv]
                out = out + pc @ shared_v
            else:
                pc = cv.transpose(-1, -2) @ p_cold.reshape(b, h, nb, t, g * tq)  # [B, H, NB, rv, GTq]
                bv = vc.basis(cold_v, *vs).reshape(b, h, nb * rv, d)
                out = out + pc.reshape(b, h, nb * rv, g * tq).transpose(-1, -2) @ bv
        out = out / denom.clamp_min(torch.finfo(torch.float32).tiny).transpose(-1, -2)
        out = out.masked_fill(~seen.transpose(-1, -2), 0.0)
        return out.reshape(b, hq, tq, d).to(q.dtype)
