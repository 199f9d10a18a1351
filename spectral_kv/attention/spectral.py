"""`spectral`: attend in the compressed space, never materializing cold K/V."""

from __future__ import annotations

import torch

from ..compressors import FactoredCompressor
from .base import AttentionStrategy, register_attention

__all__ = ["SpectralAttention"]


@register_attention("spectral")
class SpectralAttention(AttentionStrategy):
    """Cold scores as ``((q @ B_kᵀ) * s_k) @ C_kᵀ``; one float32 softmax jointly with the exact
    tokens; cold values as ``((p @ C_v) * s_v) @ B_v``. GQA folds the ``G`` query heads of a
    KV head into the query axis, so K/V are never repeated.

    This is the readable torch version (the reference the fused kernel is tested against);
    it reads the compressed bytes a few times, so on GPUs it is slower than SDPA.
    """

    def __init__(self, config, key_compressor, value_compressor):
        super().__init__(config, key_compressor, value_compressor)
        for comp in (key_compressor, value_compressor):
            if not isinstance(comp, FactoredCompressor):
                raise ValueError(f"attention='spectral' needs a factored compressor, got {type(comp).__name__}")

    def attend(self, q, cold_k, cold_v, cold_valid, exact_k, exact_v, exact_mask, scaling):
        b, hq, tq, d = q.shape
        h = exact_k.shape[1]
        g = hq // h
        # [B, H, G*Tq, D]: row r of KV head h is query head h*G + r // Tq at position r % Tq.
        qf = q.float().reshape(b, h, g * tq, d)

        def fold(mask):  # [B, 1, Tq, L] -> [B, 1, G*Tq, L]
            return mask.unsqueeze(2).expand(b, 1, g, tq, mask.shape[-1]).reshape(b, 1, g * tq, mask.shape[-1])

        exact_scores = (qf @ exact_k.float().transpose(-1, -2)) * scaling  # [B, H, GTq, Te]
        if exact_mask is not None:
            exact_scores = exact_scores.masked_fill(~fold(exact_mask), float("-inf"))
        parts = [exact_scores]
        nb = 0
        if cold_k:
            ck = self.key_compressor.coefficients(cold_k)  # [B, H, NB, T, rk]
            nb, t = ck.shape[2], ck.shape[3]
            qb = torch.einsum("bhqd,bhnrd->bhnqr", qf, self.key_compressor.basis(cold_k))
            cold_scores = torch.einsum("bhnqr,bhntr->bhqnt", qb, ck).reshape(b, h, g * tq, nb * t) * scaling
            if cold_valid is not None:
                keep = cold_valid[:, None, None, :, None].expand(b, 1, 1, nb, t).reshape(b, 1, 1, nb * t)
                cold_scores = cold_scores.masked_fill(~keep, float("-inf"))
            parts.insert(0, cold_scores)
        scores = torch.cat(parts, dim=-1)
        m = scores.amax(dim=-1, keepdim=True)
        seen = torch.isfinite(m)
        p = torch.exp(scores - torch.where(seen, m, torch.zeros_like(m)))
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        n_cold_tokens = scores.shape[-1] - exact_scores.shape[-1]
        out = p[..., n_cold_tokens:] @ exact_v.float()
        if nb:
            cv = self.value_compressor.coefficients(cold_v)  # [B, H, NB, T, rv]
            p_cold = p[..., :n_cold_tokens].reshape(b, h, g * tq, nb, t)
            pc = torch.einsum("bhqnt,bhntr->bhnqr", p_cold, cv)
            out = out + torch.einsum("bhnqr,bhnrd->bhqd", pc, self.value_compressor.basis(cold_v))
        out = out.masked_fill(~seen, 0.0)
        return out.reshape(b, hq, tq, d).to(q.dtype)
