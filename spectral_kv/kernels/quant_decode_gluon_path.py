"""`quant_decode`'s Gluon path (issue 13): which calls it serves, and its three launches.

On CUDA the op runs, where it can (`gluon_serves`):

1. ``qk = q @ R_k[:Dk]ᵀ`` in fp32 (`rotate_query`: the `tl` query kernel; identity: q's first Dk
   columns cast), [B, Hq, Dk];
2. the Gluon cold kernel (`quant_decode_gluon.cold_partials`): split-K partials of the cold blocks,
   planned for the blocks in use (``cold_blocks``; a static pool's spare slots get splits whose
   unit range is empty: they store an empty partial, ``-inf / 0 / 0``, and read no codes);
3. the finish kernel (`quant_finish_triton.qd_finish_kernel`): the exact tail, the joint softmax
   merge, the value rotation and the cast to q's dtype.

Everything else (multi-segment layouts, G > 8, fp32 operands, the interpreter / CPU, the `tl`
kernel's knobs) is the `tl` kernel's (`quant_decode_triton`): ``backend="auto"`` picks it by design;
``backend="gluon"`` raises naming the reason instead. `query_in_key_basis` and `finish_reference`
are the two `tl` kernels' torch twins.
"""

from __future__ import annotations

import torch

from ..codes import CodeLayout
from . import quant_decode_gluon as QG
from .launch import nonempty, num_sms, pow2
from .quant_plan import choose_tiles_per_split

try:  # triton is optional (the module's checks and the twin work without it)
    from .quant_finish_triton import qd_finish_kernel, qd_query_kernel
except Exception:  # pragma: no cover - depends on the environment
    qd_finish_kernel = qd_query_kernel = None

__all__ = ["gluon_serves", "gluon_decode", "finish", "finish_reference", "rotate_query", "query_in_key_basis", "MAX_G"]

MAX_G = 8  # the Gluon kernel's value dot takes the query heads as its N = 8 (G <= 8: the measured path)
FINISH_WARPS = 4  # the finish kernel's tiles (`finish`) are sized for 4 warps
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


def rotate_query(q, rk, dk: int, ch: int = 0, num_warps: int = 0) -> torch.Tensor:
    """The Gluon kernel's query: ``q @ R_k[:Dk]ᵀ`` fp32 [B, Hq, Dk] by `qd_query_kernel` (one launch;
    rk [B, H, R, D] in any float dtype, stride-0 dims read in place), or with rk None (identity)
    q's first Dk columns cast to fp32 (one launch; the Gluon kernel also reads q's own dtype, but
    that form has not run on a GPU). `query_in_key_basis` is the twin.
    ``ch`` / ``num_warps``: key channels per program and warps (0: 32 and 4)."""
    if rk is None:
        return q[..., :dk].float()
    B, Hq, D = q.shape
    H = rk.shape[1]
    qk = torch.empty((B, Hq, dk), dtype=torch.float32, device=q.device)
    ch = ch or min(32, pow2(dk, 16))
    qd_query_kernel[(B * H, -(-dk // ch))](
        q, rk, qk, H, D, dk, *q.stride(), *rk.stride(), qk.stride(0), qk.stride(1),
        G=Hq // H, G_PAD=pow2(Hq // H, 16), D_PAD=pow2(D, 16), CH=ch, num_warps=num_warps or 4)
    return qk


def query_in_key_basis(q, rk, dk: int) -> torch.Tensor:
    """fp32 [B, Hq, Dk]: ``q @ R_k[:Dk]ᵀ`` per (row, KV head), q [B, Hq, D], rk [B, H, R, D] or None
    (identity: q's first Dk columns), in torch: `rotate_query`'s twin. A shared or per-head basis
    (stride-0 dims) is multiplied as the one matrix it is, not materialized per row."""
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


def finish(q, rv, m, l, acc, exact_k, exact_v, n_exact, scaling, rb: int = 0, block_e: int = 0):
    """The finish kernel: exact tail + cold partials -> out [B, Hq, D] in q's dtype.

    q [B, Hq, D] and exact_k / exact_v [B, H, Te, D] in q's dtype; rv [B, H, R >= Dv, D] or None
    (identity); m, l fp32 [B, H, S, G] and acc fp32 [B, H, S, G, Dv] (value basis; -inf / 0 / 0
    for an empty split), each contiguous within a (row, head) and m, l with equal strides, as
    `QG.cold_partials` or its twin return them (S may be 0); n_exact int32 [B]. Same result as
    `finish_reference`. ``rb`` / ``block_e``: the kernel's tile knobs (0: the defaults below)."""
    B, Hq, D = q.shape
    H, Te = exact_k.shape[1], exact_k.shape[2]
    G, S, dv = Hq // H, m.shape[2], acc.shape[-1]
    if m.shape != (B, H, S, G) or l.shape != m.shape or l.stride() != m.stride() or acc.shape != m.shape + (dv,):
        raise ValueError(f"finish: m/l/acc shaped {tuple(m.shape)}/{tuple(l.shape)}/{tuple(acc.shape)} (m, l with equal "
                         f"strides), expected [B={B}, H={H}, S, G={G}] and [.., Dv]")
    if m.dtype != torch.float32 or acc.dtype != torch.float32:
        raise ValueError(f"finish: m/acc must be float32, got {m.dtype}/{acc.dtype}")
    empty = m.numel() == 0  # no split (S = 0): never dereferenced, an fp32 stand-in (one compiled variant)
    if not empty and (m.stride()[2:] != (G, 1) or acc.stride()[2:] != (G * dv, dv, 1)):
        raise ValueError(f"finish: m strides {tuple(m.stride())} / acc strides {tuple(acc.stride())}: each (row, head)'s "
                         f"splits must be contiguous ([S, G] and [S, G, Dv] row-major)")
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    g_pad, d_pad, dv_pad = pow2(G, 16), pow2(D, 16), pow2(dv, 16)
    ch = min(32, d_pad)
    # The merge reads RB cold rows (split, head) a step, [RB, Dv] of acc with a basis, [RB, CH] for the
    # identity (4096 elements, 32 registers a thread at 4 warps), the tail 32 tokens. H200 sweep
    # (`benchmarks/results/gluon_decode_H200.txt`, 68 exact tokens): 12.2 / 16.5 / 23.5 us at 1 x 4K /
    # 8 x 32K / 16 x 32K; twice the rows or tokens at 8 warps 11.5-12.3 / 22-28 / 36-50 us (one
    # program per SM at 255 registers). sm_90: no spills at head_dim 64 / 128 (`--offline`).
    rb = rb or max(16, min(128, 4096 // (dv_pad if rv is not None else ch)))
    block_e = block_e or (32 if Te >= 32 else pow2(max(Te, 1), 16))
    if empty:
        m = l = acc = torch.zeros(1, dtype=torch.float32, device=q.device)
    ms = (0, 0) if empty else (m.stride(0), m.stride(1))
    accs = (0, 0) if empty else (acc.stride(0), acc.stride(1))
    qd_finish_kernel[(B * H, d_pad // ch)](
        q, q if rv is None else rv, nonempty(exact_k), nonempty(exact_v), n_exact,
        m, l, acc, out,
        float(scaling) * _LOG2E, H, D, S,
        *q.stride(), *(rv.stride() if rv is not None else (0,) * 4),
        *(exact_k.stride() if exact_k.numel() else (0,) * 4), *(exact_v.stride() if exact_v.numel() else (0,) * 4),
        *ms, *accs, *out.stride(),
        G=G, ROT_V=rv is not None, DV=dv, DV_PAD=dv_pad, G_PAD=g_pad, D_PAD=d_pad, CH=ch,
        BLOCK_E=block_e, RB=rb, num_warps=FINISH_WARPS,
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
        qk = rotate_query(q, rk, kl.kept)
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
