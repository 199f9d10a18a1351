"""`reconstruct`: decompress the cold blocks, concatenate the exact tokens, run SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionStrategy, expand_cold_mask, register_attention

__all__ = ["ReconstructAttention"]


def _combine_masks(cold_mask, exact_mask, b, tq, n_cold_tokens, te, device):
    if cold_mask is None and exact_mask is None:
        return None
    if cold_mask is None:
        cold_mask = torch.ones(b, 1, tq, n_cold_tokens, dtype=torch.bool, device=device)
    if exact_mask is None:
        exact_mask = torch.ones(b, 1, tq, te, dtype=torch.bool, device=device)
    return torch.cat((cold_mask, exact_mask.expand(b, 1, tq, te)), dim=-1)


def _decompress(comp, parts, dtype, shared):
    # Stateless compressors are called without ``shared`` (as they always were).
    return comp.decompress(parts, dtype, shared) if shared else comp.decompress(parts, dtype)


@register_attention("reconstruct")
class ReconstructAttention(AttentionStrategy):
    """Materializes cold K/V in the query dtype: works with any compressor; saves memory at
    rest but not bandwidth (the original design's ``use_spectral_attention=False``)."""

    def attend(self, q, view, scaling):
        b, hq, tq, d = q.shape
        exact_k, exact_v, cold_k, cold_v = view.exact_k, view.exact_v, view.cold_k, view.cold_v
        cold_valid, exact_mask = view.masks(tq)
        h = exact_k.shape[1]
        keys, values = exact_k.to(q.dtype), exact_v.to(q.dtype)
        n_cold_tokens = 0
        if cold_k:
            ck = _decompress(self.key_compressor, cold_k, q.dtype, view.shared_for_blocks("k"))  # [B, H, NB, T, D]
            cv = _decompress(self.value_compressor, cold_v, q.dtype, view.shared_for_blocks("v"))
            n_cold_tokens = ck.shape[2] * ck.shape[3]
            keys = torch.cat((ck.reshape(b, h, n_cold_tokens, d), keys), dim=2)
            values = torch.cat((cv.reshape(b, h, n_cold_tokens, d), values), dim=2)
        mask = _combine_masks(
            expand_cold_mask(cold_valid, tq, self.config.block_size),
            exact_mask,
            b,
            tq,
            n_cold_tokens,
            exact_k.shape[2],
            q.device,
        )
        # A Python bool: under torch.compile `hq != h` is a SymBool, which SDPA rejects.
        gqa = True if hq != h else False  # noqa: SIM210
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        if mask is not None:
            # SDPA's output for a query that sees nothing is undefined (NaN on some
            # backends); those are padding positions, and their zeros keep later layers finite.
            seen = mask.any(dim=-1, keepdim=True)
            out = out.masked_fill(~seen, 0.0)
        return out
