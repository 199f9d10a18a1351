"""`quant_decode`'s Gluon path (issue 13): which calls it serves, and its three launches.

On CUDA the op runs, where it can (`gluon_serves`):

1. ``qk = q @ R_k[:Dk]ᵀ`` in fp32 torch (identity: the first Dk columns), [B, Hq, Dk];
2. the Gluon cold kernel (`quant_decode_gluon.cold_partials`): split-K partials of the cold blocks,
   planned for the blocks in use (``cold_blocks``; a static pool's spare slots get splits whose
   unit range is empty: they store an empty partial, ``-inf / 0 / 0``, and read no codes);
3. the finish kernel (`quant_finish_triton.qd_finish_kernel`): the exact tail, the joint softmax
   merge, the value rotation and the cast to q's dtype.

Everything else (multi-segment layouts, G > 8, fp32 operands, the interpreter / CPU, the `tl`
kernel's knobs) is the `tl` kernel's (`quant_decode_triton`): ``backend="auto"`` picks it by design;
``backend="gluon"`` raises naming the reason instead. `finish_reference` is the finish kernel's
torch twin.
"""

from __future__ import annotations

import torch

from ..codes import CodeLayout
from . import quant_decode_gluon as QG
from .launch import nonempty, num_sms, pow2
from .quant_plan import choose_tiles_per_split

try:  # triton is optional (the module's checks and the twin work without it)
    from .quant_finish_triton import qd_finish_kernel
except Exception:  # pragma: no cover - depends on the environment
    qd_finish_kernel = None

__all__ = ["gluon_serves", "gluon_decode", "finish", "finish_reference", "query_in_key_basis", "MAX_G"]

MAX_G = 8  # the Gluon kernel's value dot takes the query heads as its N = 8 (G <= 8: the measured path)
_LOG2E = 1.4426950408889634


def gluon_serves(q, k_codes, k_scale, v_codes, v_scale, kl: CodeLayout, vl: CodeLayout, key_group: int,
                 operands: str = "fp16", unpack: str = "auto", block_rows: int = 0, num_warps: int = 0,
                 num_stages: int = 0, interpreted: bool = False) -> tuple[bool, str]:
    """(True, "") when the Gluon path can run this call of `quant_decode`, else (False, why).

    Arguments as `quant_decode` (tensors already checked by its ``_check_inputs``); ``interpreted``:
    Triton runs under TRITON_INTERPRET (Gluon has no interpreter). Cheap checks come first: this
    runs once per layer per decode step."""
    if not QG.HAS_GLUON:
        return False, f"triton.experimental.gluon is missing (triton >= 3.6): {QG.GLUON_IMPORT_ERROR!r}"
    if qd_finish_kernel is None:
        return False, "triton is missing (the finish kernel)"
    if not q.is_cuda:
        return False, f"q is on {q.device}, the Gluon kernel runs on CUDA only"
    if interpreted:
        return False, "TRITON_INTERPRET is set and Gluon has no interpreter"
    if operands != "fp16":
        return False, f"operands={operands!r}: the Gluon kernel's dots take fp16 operands only"
    if unpack != "auto":
        return False, f"unpack={unpack!r}: the Gluon kernel has one code form (fp16 subnormals, 'auto')"
    if block_rows or num_warps or num_stages:
        return False, (f"block_rows={block_rows}, num_warps={num_warps}, num_stages={num_stages} are knobs of the "
                       "tl kernel (0 for the Gluon path)")
    G = q.shape[1] // k_codes.shape[1]
    if G > MAX_G:
        return False, f"G={G} query heads per KV head; the Gluon path takes 1..{MAX_G}"
    try:
        QG.check_layouts(kl, vl, G, int(key_group))
    except ValueError as exc:
        return False, str(exc)
    if k_scale.stride(-1) != 1 or v_scale.stride(3) != 1:
        return False, (f"k_scale strides {tuple(k_scale.stride())} / v_scale strides {tuple(v_scale.stride())}: "
                       "the Gluon kernel needs contiguous key channels and value tokens")
    if v_codes.numel() and (v_codes.stride(2) % 4 or vl.nbytes % 4):
        return False, f"v_codes strides {tuple(v_codes.stride())}: the Gluon kernel reads 4-byte words per block"
    return True, ""


def query_in_key_basis(q, rk, dk: int) -> torch.Tensor:
    """fp32 [B, Hq, Dk]: ``q @ R_k[:Dk]ᵀ`` per (row, KV head), q [B, Hq, D], rk [B, H, R, D] or None
    (identity: q's first Dk columns). A shared or per-head basis (stride-0 dims) is multiplied as
    the one matrix it is, not materialized per row."""
    B, Hq, D = q.shape
    qf = q.float()
    if rk is None:
        return qf[..., :dk].contiguous()
    H = rk.shape[1]
    # the strides are read before any dtype conversion: .float() of an expanded fp16 basis would
    # materialize all B * H copies of it
    if rk.stride(0) == 0 and rk.stride(1) == 0:
        return qf @ rk[0, 0, :dk].float().transpose(0, 1)
    qh = qf.view(B, H, Hq // H, D)
    if rk.stride(0) == 0:
        return torch.einsum("bhgd,hkd->bhgk", qh, rk[0, :, :dk].float()).reshape(B, Hq, dk)
    return (qh @ rk[:, :, :dk].float().transpose(-1, -2)).reshape(B, Hq, dk)


def finish(q, rv, m, l, acc, exact_k, exact_v, n_exact, scaling):
    """The finish kernel: exact tail + cold partials -> out [B, Hq, D] in q's dtype.

    q [B, Hq, D] and exact_k / exact_v [B, H, Te, D] in q's dtype; rv [B, H, R >= Dv, D] or None
    (identity); m, l fp32 [B, H, S, G] (equal strides; -inf / 0 for an empty split) and acc fp32
    [B, H, S, G, Dv] (value basis), as `QG.cold_partials` or its twin return them (S may be 0);
    n_exact int32 [B]. Same result as `finish_reference`."""
    B, Hq, D = q.shape
    H, Te = exact_k.shape[1], exact_k.shape[2]
    G, S, dv = Hq // H, m.shape[2], acc.shape[-1]
    if m.shape != (B, H, S, G) or l.shape != m.shape or l.stride() != m.stride() or acc.shape != m.shape + (dv,):
        raise ValueError(f"finish: m/l/acc shaped {tuple(m.shape)}/{tuple(l.shape)}/{tuple(acc.shape)} (m, l with equal "
                         f"strides), expected [B={B}, H={H}, S, G={G}] and [.., Dv]")
    if m.dtype != torch.float32 or acc.dtype != torch.float32:
        raise ValueError(f"finish: m/acc must be float32, got {m.dtype}/{acc.dtype}")
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    g_pad, d_pad, dv_pad = pow2(G, 16), pow2(D, 16), pow2(dv, 16)
    ch = min(32, d_pad)
    # Tiles of ~2048 elements (the merge's [SB, G_PAD, columns], the tail's [BLOCK_E, D_PAD]): sm_90 at
    # head_dim 128, 4 warps, 200 registers and no spills (`benchmarks/gluon_decode.py --offline`); the
    # tl kernel's 64 exact tokens a step and 8192-element merge tiles spilled ~500 bytes a thread
    sb = max(1, 2048 // (g_pad * (dv_pad if rv is not None else ch)))
    empty = m.numel() == 0  # no split (S = 0): never dereferenced, an fp32 stand-in (one compiled variant)
    if empty:
        m = l = acc = torch.zeros(1, dtype=torch.float32, device=q.device)
    ms, accs = ((0,) * 4, (0,) * 5) if empty else (m.stride(), acc.stride())
    qd_finish_kernel[(B * H, d_pad // ch)](
        q, q if rv is None else rv, nonempty(exact_k), nonempty(exact_v), n_exact,
        m, l, acc, out,
        float(scaling) * _LOG2E, H, G, D, S,
        *q.stride(), *(rv.stride() if rv is not None else (0,) * 4),
        *(exact_k.stride() if exact_k.numel() else (0,) * 4), *(exact_v.stride() if exact_v.numel() else (0,) * 4),
        *ms, *accs, *out.stride(),
        ROT_V=rv is not None, DV=dv, DV_PAD=dv_pad, G_PAD=g_pad, D_PAD=d_pad, CH=ch,
        BLOCK_E=32 if Te >= 32 else pow2(max(Te, 1), 16), SB=sb, num_warps=4,
    )
    return out


def finish_reference(q, rv, m, l, acc, exact_k, exact_v, n_exact, scaling):
    """The finish kernel's fp32 torch twin (arguments as `finish`): [B, Hq, D] in q's dtype."""
    B, Hq, D = q.shape
    H, Te = exact_k.shape[1], exact_k.shape[2]
    G, dv = Hq // H, acc.shape[-1]
    qf = q.float().view(B, H, G, D)
    tok_ok = torch.arange(Te, device=q.device)[None, :] < n_exact.long()[:, None]  # [B, Te]
    ok = tok_ok[:, None, :, None]
    ek, ev = torch.where(ok, exact_k.float(), 0.0), torch.where(ok, exact_v.float(), 0.0)
    s = torch.einsum("bhgd,bhtd->bhgt", qf, ek) * (float(scaling) * _LOG2E)
    s = s.masked_fill(~tok_ok[:, None, None, :], float("-inf"))
    none = torch.full((B, H, G), float("-inf"), device=q.device)
    m_g = torch.maximum(s.amax(-1) if Te else none, m.amax(2) if m.shape[2] else none)  # [B, H, G]
    m_g = torch.where(torch.isfinite(m_g), m_g, torch.zeros_like(m_g))
    p = torch.exp2(s - m_g[..., None])
    w = torch.exp2(m - m_g[:, :, None])  # [B, H, S, G]
    den = p.sum(-1) + (w * l).sum(2)
    cold = (w[..., None] * acc).sum(2)  # [B, H, G, Dv], value basis
    cold = torch.nn.functional.pad(cold, (0, D - dv)) if rv is None else cold @ rv[:, :, :dv].float()
    out = (torch.einsum("bhgt,bhtd->bhgd", p, ev) + cold) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out.reshape(B, Hq, D).to(q.dtype)


def gluon_decode(q, rk, rv, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, exact_k, exact_v, n_exact,
                 scaling, kl: CodeLayout, vl: CodeLayout, key_group: int, tiles_per_split: int = 0,
                 max_registers: int = 0, cold_blocks: int = 0):
    """`quant_decode` on the Gluon path (arguments as there; `gluon_serves` must have said yes):
    out [B, Hq, D] in q's dtype. ``tiles_per_split``: Gluon units (16 rows of the smallest plane
    of a block) per program, 0 = `choose_tiles_per_split` for 8 one-warp programs per SM."""
    B, Hq, D = q.shape
    H, NB = k_codes.shape[1], k_codes.shape[2]
    G = Hq // H
    if NB > 0:
        qk = query_in_key_basis(q, rk, kl.kept)
        nr = QG.unit_plan(kl, vl)[2]
        in_use = min(cold_blocks, NB) if cold_blocks > 0 else NB
        tps = tiles_per_split if tiles_per_split > 0 else choose_tiles_per_split(B * H, in_use * nr, num_sms(q.device),
                                                                                 per_sm=8)
        m, l, acc, _ = QG.cold_partials(qk, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, n_cold, scaling, kl, vl,
                                        key_group, tps=tps, max_registers=max_registers)
    else:  # no cold block: the finish kernel alone (its split loops run zero times)
        m = torch.empty((B, H, 0, G), dtype=torch.float32, device=q.device)
        l, acc = torch.empty_like(m), torch.empty((B, H, 0, G, vl.kept), dtype=torch.float32, device=q.device)
    return finish(q, rv, m, l, acc, exact_k, exact_v, n_exact, scaling)
