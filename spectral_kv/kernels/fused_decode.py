"""Fused decode attention over a spectrally compressed KV cache (one layer, q_len = 1).

Cold 512-token blocks are stored as int8 coefficients C [T, r] with one fp32 scale per
component and an fp16 basis B [r, D], so that K_block ~= (C * scale) @ B. The exact tail
(sinks + warm + hot tokens) is a plain right-padded [Te, D] buffer.

Public entry points
-------------------
fused_decode(...)            Triton split-K kernel (+ a tiny combine kernel); needs triton.
fused_decode_reference(...)  Pure-torch fp32 twin that defines the math; always available.
torch.ops.spectral_kv.fused_decode  The same kernel as a ``torch.library.triton_op``
                                    (registered only when triton imports).

Kernel plan (why it is fast): per (batch row, KV head, run of blocks) one program loads
the G query heads of the GQA group once, projects them onto the block's key basis
(qb = q @ B_k^T, [G, rk]), scores the T tokens in rank space (qb*scale_k @ C_k^T), keeps
the online softmax in fp32 and accumulates p @ C_v in rank space [G, rv]; only at the
end of a block does it multiply by scale_v and B_v. So each block costs T*(rk+rv) int8
bytes plus two small bases, read once for all G query heads. A second launch merges
the per-split (max, sum, acc) partials (flash-decoding).

Why this module is longer than ~350 lines: the pure-torch reference, the split-K Triton kernel,
its combine kernel and the ``triton_op`` registration are one op and its twin, read together.
"""
from __future__ import annotations

import math

import torch

from .launch import pow2 as _pow2, num_sms as _num_sms, is_fake as _is_fake, nonempty as _nonempty, strides as _strides

try:  # triton is optional: the reference must work without it.
    import triton
    import triton.language as tl

    from .exact_tail_triton import exact_tail

    _TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ["fused_decode", "fused_decode_reference", "HAS_TRITON"]

HAS_TRITON = triton is not None
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- reference
def fused_decode_reference(
    q: torch.Tensor,
    k_coeffs: torch.Tensor,
    k_scales: torch.Tensor,
    k_basis: torch.Tensor,
    v_coeffs: torch.Tensor,
    v_scales: torch.Tensor,
    v_basis: torch.Tensor,
    n_cold: torch.Tensor,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    n_exact: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Decode attention over compressed cold blocks plus an exact tail, in fp32 torch.

    Parameters
    ----------
    q : [B, Hq, D] fp16/bf16/fp32, Hq = H * G (query head h*G+g uses KV head h).
    k_coeffs : int8 [B, H, NB, T, rk]
    k_scales : float32 [B, H, NB, rk]
    k_basis : float16 [B, H, NB, rk, D]
    v_coeffs, v_scales, v_basis : as the key tensors, with rank rv.
    n_cold : int32 [B], valid cold blocks per row (blocks >= n_cold[b] are ignored).
    exact_k, exact_v : [B, H, Te, D] (model dtype), right-padded.
    n_exact : int32 [B], valid exact tokens per row.
    scaling : softmax scale applied to q.k.

    Returns
    -------
    out : [B, Hq, D] in q.dtype; one joint fp32 softmax over valid cold and exact
        tokens. A row with no valid token gets zeros.
    """
    B, Hq, D = q.shape
    H = exact_k.shape[1]
    G = Hq // H
    NB, T = k_coeffs.shape[2], k_coeffs.shape[3]
    dev = q.device
    qf = q.float().view(B, H, G, D)

    blk_ok = torch.arange(NB, device=dev)[None, :] < n_cold.to(dev).long()[:, None]  # [B, NB]
    ok5 = blk_ok[:, None, :, None, None]
    # Garbage blocks may hold non-finite scales/bases: zero them so 0 * garbage = 0.
    k_s = torch.where(blk_ok[:, None, :, None], k_scales.float(), 0.0)
    v_s = torch.where(blk_ok[:, None, :, None], v_scales.float(), 0.0)
    k_b = torch.where(ok5, k_basis.float(), 0.0)
    v_b = torch.where(ok5, v_basis.float(), 0.0)

    # Spectral scores: project q onto each block basis, then score in rank space.
    qb = torch.einsum("bhgd,bhnrd->bhngr", qf, k_b) * k_s[:, :, :, None, :]
    s_cold = torch.einsum("bhngr,bhntr->bhgnt", qb, k_coeffs.float()) * scaling
    s_cold = s_cold.masked_fill(~blk_ok[:, None, None, :, None], float("-inf"))

    Te = exact_k.shape[2]
    tok_ok = torch.arange(Te, device=dev)[None, :] < n_exact.to(dev).long()[:, None]  # [B, Te]
    s_ex = torch.einsum("bhgd,bhtd->bhgt", qf, exact_k.float()) * scaling
    s_ex = s_ex.masked_fill(~tok_ok[:, None, None, :], float("-inf"))

    s = torch.cat([s_cold.reshape(B, H, G, NB * T), s_ex], dim=-1)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-masked rows
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    p_cold = p[..., : NB * T].reshape(B, H, G, NB, T)
    p_ex = p[..., NB * T :]

    pc = torch.einsum("bhgnt,bhntr->bhngr", p_cold, v_coeffs.float()) * v_s[:, :, :, None, :]
    out = torch.einsum("bhngr,bhnrd->bhgd", pc, v_b)
    ev = torch.where(tok_ok[:, None, :, None], exact_v.float(), 0.0)
    out = out + torch.einsum("bhgt,bhtd->bhgd", p_ex, ev)
    out = torch.where(l > 0, out / l.clamp_min(1e-30), torch.zeros_like(out))
    return out.reshape(B, Hq, D).to(q.dtype)


# --------------------------------------------------------------------------- triton
if HAS_TRITON:

    # Context-dependent counts are not specialized on (see quant_decode_triton: no recompiles
    # when one of them becomes 1 or a multiple of 16 as the cache grows).
    @triton.jit(do_not_specialize=["BPS", "S_COLD", "S_TOT"])
    def _fd_partial_kernel(
        q_ptr, kc_ptr, ks_ptr, kb_ptr, vc_ptr, vs_ptr, vb_ptr, ncold_ptr,
        ek_ptr, ev_ptr, nexact_ptr,
        m_ptr, l_ptr, acc_ptr,
        qk_scale,
        H, G, D, RK, RV, BPS, S_COLD, S_TOT,
        sq_b, sq_h, sq_d,
        skc_b, skc_h, skc_n, skc_t, skc_r,
        sks_b, sks_h, sks_n, sks_r,
        skb_b, skb_h, skb_n, skb_r, skb_d,
        svc_b, svc_h, svc_n, svc_t, svc_r,
        svs_b, svs_h, svs_n, svs_r,
        svb_b, svb_h, svb_n, svb_r, svb_d,
        sek_b, sek_h, sek_t, sek_d,
        sev_b, sev_h, sev_t, sev_d,
        T: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
        G_PAD: tl.constexpr, D_PAD: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr,
        PV_HALF: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_rk = tl.arange(0, RK_PAD)
        offs_rv = tl.arange(0, RV_PAD)
        g_ok = offs_g < G
        d_ok = offs_d < D
        rk_ok = offs_rk < RK
        rv_ok = offs_rv < RV

        # The whole GQA group is one tile, so each compressed byte is read once for G heads.
        q_rows = (h * G + offs_g).to(tl.int64)
        q = tl.load(q_ptr + b * sq_b + q_rows[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        # scaling * log2(e): the softmax runs on exp2. Cast back: Inductor passes the float
        # argument as an fp64 constant, which would make q (and the dots) fp64.
        q = (q * qk_scale).to(tl.float32)

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)

        if split < S_COLD:
            n_c = tl.load(ncold_ptr + b).to(tl.int64)
            blk_lo = split.to(tl.int64) * BPS
            blk_hi = tl.minimum(blk_lo + BPS, n_c)
            for n64 in range(blk_lo, blk_hi):  # int64 so pool offsets cannot overflow
                kb = tl.load(kb_ptr + b * skb_b + h * skb_h + n64 * skb_n
                             + offs_rk[:, None] * skb_r + offs_d[None, :] * skb_d,
                             mask=rk_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                ks = tl.load(ks_ptr + b * sks_b + h * sks_h + n64 * sks_n + offs_rk * sks_r,
                             mask=rk_ok, other=0.0)
                vb = tl.load(vb_ptr + b * svb_b + h * svb_h + n64 * svb_n
                             + offs_rv[:, None] * svb_r + offs_d[None, :] * svb_d,
                             mask=rv_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                vs = tl.load(vs_ptr + b * svs_b + h * svs_h + n64 * svs_n + offs_rv * svs_r,
                             mask=rv_ok, other=0.0)
                # Project q onto the key basis once per block; tokens are then scored in rank space.
                qbs = tl.dot(q, tl.trans(kb)) * ks[None, :]  # [G_PAD, RK_PAD]
                acc_r = tl.zeros([G_PAD, RV_PAD], tl.float32)
                kc_base = kc_ptr + b * skc_b + h * skc_h + n64 * skc_n
                vc_base = vc_ptr + b * svc_b + h * svc_h + n64 * svc_n
                for c in tl.static_range(0, T, BLOCK_T):
                    offs_t = c + tl.arange(0, BLOCK_T)
                    t_ok = offs_t < T
                    ck = tl.load(kc_base + offs_t[:, None] * skc_t + offs_rk[None, :] * skc_r,
                                 mask=t_ok[:, None] & rk_ok[None, :], other=0).to(tl.float32)
                    s = tl.dot(qbs, tl.trans(ck))  # [G_PAD, BLOCK_T]
                    s = tl.where(t_ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    cv = tl.load(vc_base + offs_t[:, None] * svc_t + offs_rv[None, :] * svc_r,
                                 mask=t_ok[:, None] & rv_ok[None, :], other=0)
                    if PV_HALF:  # int8 is exact in fp16 and p <= 1: halves smem and converts
                        acc_r = acc_r * alpha[:, None] + tl.dot(p.to(tl.float16), cv.to(tl.float16))
                    else:
                        acc_r = acc_r * alpha[:, None] + tl.dot(p, cv.to(tl.float32))
                    acc = acc * alpha[:, None]
                    m_i = m_new
                # Leave rank space once per block.
                acc += tl.dot(acc_r * vs[None, :], vb)
        else:
            n_e = tl.load(nexact_ptr + b)
            ek_base = ek_ptr + b * sek_b + h * sek_h
            ev_base = ev_ptr + b * sev_b + h * sev_h
            m_i, l_i, acc = exact_tail(q, ek_base, ev_base, n_e, sek_t, sek_d, sev_t, sev_d, offs_d, d_ok, offs_d, d_ok,
                                       m_i, l_i, acc, BLOCK_E)

        ws = pid_bh.to(tl.int64) * S_TOT + split
        tl.store(m_ptr + ws * G_PAD + offs_g, m_i)
        tl.store(l_ptr + ws * G_PAD + offs_g, l_i)
        # Only the G real rows: the combine pass re-reads this, padding rows would be pure waste.
        tl.store(acc_ptr + ws * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD + offs_d[None, :], acc,
                 mask=g_ok[:, None])

    @triton.jit(do_not_specialize=["S_TOT"])
    def _fd_combine_kernel(
        m_ptr, l_ptr, acc_ptr, out_ptr,
        H, G, D, S_TOT,
        so_b, so_h, so_d,
        S_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_DC: tl.constexpr,
    ):
        # Grid (B*H, D / BLOCK_DC): spreading D over programs keeps small-batch combines
        # (few rows, many splits) from serialising on a handful of SMs.
        pid_bh = tl.program_id(0)
        pid_d = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        offs_s = tl.arange(0, S_PAD)
        offs_g = tl.arange(0, G_PAD)
        offs_d = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
        g_ok = offs_g < G
        base = pid_bh.to(tl.int64) * S_TOT
        s_ok = offs_s < S_TOT
        m = tl.load(m_ptr + (base + offs_s[:, None]) * G_PAD + offs_g[None, :],
                    mask=s_ok[:, None], other=float("-inf"))
        m_g = tl.max(m, axis=0)
        m_g = tl.where(m_g == float("-inf"), 0.0, m_g)  # empty rows: weights become 0
        lsum = tl.zeros([G_PAD], tl.float32)
        out = tl.zeros([G_PAD, BLOCK_DC], tl.float32)
        for s in range(0, S_TOT):
            m_s = tl.load(m_ptr + (base + s) * G_PAD + offs_g)
            w = tl.exp2(m_s - m_g)
            lsum += w * tl.load(l_ptr + (base + s) * G_PAD + offs_g)
            a = tl.load(acc_ptr + (base + s) * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD + offs_d[None, :],
                        mask=g_ok[:, None], other=0.0)
            out += a * w[:, None]
        out = tl.where(lsum[:, None] > 0, out / tl.maximum(lsum, 1e-30)[:, None], 0.0)
        rows = (h * G + offs_g).to(tl.int64)
        tl.store(out_ptr + b * so_b + rows[:, None] * so_h + offs_d[None, :] * so_d,
                 out.to(out_ptr.dtype.element_ty),
                 mask=g_ok[:, None] & (offs_d < D)[None, :])


def _default_blocks_per_split(B: int, H: int, NB: int, device: torch.device) -> int:
    # H100 sweep (NOTES_kernels.md): best at ~1-8 programs per SM, <= 16 blocks per program.
    bps = (B * H * NB) // max(1, _num_sms(device))
    return int(min(16, max(1, bps)))


def _interpreted() -> bool:
    return type(_fd_partial_kernel).__name__ == "InterpretedFunction"


def _fused_decode_impl(q, k_coeffs, k_scales, k_basis, v_coeffs, v_scales, v_basis,
                       n_cold, exact_k, exact_v, n_exact, scaling,
                       blocks_per_split, block_t, num_warps, num_stages, pv_half, launch):
    B, Hq, D = q.shape
    H = exact_k.shape[1]
    G = Hq // H
    NB, T, RK = k_coeffs.shape[2], k_coeffs.shape[3], k_coeffs.shape[4]
    RV = v_coeffs.shape[4]
    Te = exact_k.shape[2]
    dev = q.device

    G_PAD = _pow2(G, 16)  # tl.dot needs M >= 16; the padding rows are zeros
    D_PAD = _pow2(D, 16)
    RK_PAD = _pow2(RK, 16)
    RV_PAD = _pow2(RV, 16)
    BLOCK_T = block_t if block_t > 0 else min(_pow2(T, 16), 512)
    BLOCK_E = 64 if Te >= 64 else _pow2(max(Te, 1), 16)
    bps = blocks_per_split if blocks_per_split > 0 else _default_blocks_per_split(B, H, NB, dev)
    S_COLD = (NB + bps - 1) // bps if NB > 0 else 0
    S_TOT = S_COLD + 1  # last split: the exact tail
    nw = num_warps if num_warps > 0 else 4
    ns = num_stages if num_stages > 0 else 2
    pv_half = 1 if pv_half < 0 else pv_half

    m_ws = torch.empty((B * H * S_TOT, G_PAD), dtype=torch.float32, device=dev)
    l_ws = torch.empty_like(m_ws)
    acc_ws = torch.empty((B * H * S_TOT, G_PAD, D_PAD), dtype=torch.float32, device=dev)
    out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
    if _interpreted() and _is_fake(q):
        # Under TRITON_INTERPRET=1 wrap_triton hands back the bare interpreter, which would
        # try to read fake storage; shapes are all the fake kernel has to produce.
        return out

    launch(_fd_partial_kernel)[(B * H, S_TOT)](
        q, _nonempty(k_coeffs), _nonempty(k_scales), _nonempty(k_basis),
        _nonempty(v_coeffs), _nonempty(v_scales), _nonempty(v_basis), n_cold,
        _nonempty(exact_k), _nonempty(exact_v), n_exact,
        m_ws, l_ws, acc_ws,
        float(scaling) * _LOG2E,
        H, G, D, RK, RV, bps, S_COLD, S_TOT,
        *q.stride(),
        *_strides(k_coeffs, 5), *_strides(k_scales, 4), *_strides(k_basis, 5),
        *_strides(v_coeffs, 5), *_strides(v_scales, 4), *_strides(v_basis, 5),
        *_strides(exact_k, 4), *_strides(exact_v, 4),
        T=T, BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E,
        G_PAD=G_PAD, D_PAD=D_PAD, RK_PAD=RK_PAD, RV_PAD=RV_PAD, PV_HALF=bool(pv_half),
        num_warps=nw, num_stages=ns,
    )
    BLOCK_DC = min(D_PAD, 32)
    launch(_fd_combine_kernel)[(B * H, D_PAD // BLOCK_DC)](
        m_ws, l_ws, acc_ws, out, H, G, D, S_TOT, *out.stride(),
        S_PAD=_pow2(S_TOT, 2), G_PAD=G_PAD, D_PAD=D_PAD, BLOCK_DC=BLOCK_DC, num_warps=2,
    )
    return out


def _check_inputs(q, k_coeffs, k_scales, k_basis, v_coeffs, v_scales, v_basis,
                  n_cold, exact_k, exact_v, n_exact):
    B, Hq, D = q.shape
    H = exact_k.shape[1]
    if Hq % H:
        raise ValueError(f"Hq={Hq} is not a multiple of H={H}")
    if k_coeffs.dtype != torch.int8 or v_coeffs.dtype != torch.int8:
        raise TypeError("k_coeffs / v_coeffs must be int8")
    if n_cold.dtype != torch.int32 or n_exact.dtype != torch.int32:
        raise TypeError("n_cold / n_exact must be int32")
    if k_coeffs.shape[:3] != v_coeffs.shape[:3] or k_coeffs.shape[:2] != (B, H):
        raise ValueError("k/v coefficient pools must be [B, H, NB, T, r] with matching B, H, NB")
    if k_basis.shape[-1] != D or v_basis.shape[-1] != D or exact_k.shape[-1] != D:
        raise ValueError("head_dim mismatch")


if HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("spectral_kv::fused_decode", mutates_args=())
    def _fused_decode_op(
        q: torch.Tensor,
        k_coeffs: torch.Tensor,
        k_scales: torch.Tensor,
        k_basis: torch.Tensor,
        v_coeffs: torch.Tensor,
        v_scales: torch.Tensor,
        v_basis: torch.Tensor,
        n_cold: torch.Tensor,
        exact_k: torch.Tensor,
        exact_v: torch.Tensor,
        n_exact: torch.Tensor,
        scaling: float,
        blocks_per_split: int = 0,
        block_t: int = 0,
        num_warps: int = 0,
        num_stages: int = 0,
        pv_half: int = -1,
    ) -> torch.Tensor:
        return _fused_decode_impl(q, k_coeffs, k_scales, k_basis, v_coeffs, v_scales, v_basis,
                                  n_cold, exact_k, exact_v, n_exact, scaling,
                                  blocks_per_split, block_t, num_warps, num_stages, pv_half, wrap_triton)


def fused_decode(
    q: torch.Tensor,
    k_coeffs: torch.Tensor,
    k_scales: torch.Tensor,
    k_basis: torch.Tensor,
    v_coeffs: torch.Tensor,
    v_scales: torch.Tensor,
    v_basis: torch.Tensor,
    n_cold: torch.Tensor,
    exact_k: torch.Tensor,
    exact_v: torch.Tensor,
    n_exact: torch.Tensor,
    scaling: float,
    *,
    blocks_per_split: int = 0,
    block_t: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    pv_half: int = -1,
) -> torch.Tensor:
    """Triton fused decode attention; same contract as :func:`fused_decode_reference`.

    Parameters
    ----------
    q : [B, Hq, D] fp16/bf16/fp32 (Hq = H*G; query head h*G+g reads KV head h).
    k_coeffs, v_coeffs : int8 [B, H, NB, T, rk] / [B, H, NB, T, rv]
    k_scales, v_scales : float32 [B, H, NB, rk] / [B, H, NB, rv]
    k_basis, v_basis : float16 [B, H, NB, rk, D] / [B, H, NB, rv, D]
    n_cold : int32 [B] valid cold blocks per row, on q's device.
    exact_k, exact_v : [B, H, Te, D] any float dtype, right-padded.
    n_exact : int32 [B] valid exact tokens per row, on q's device.
    scaling : softmax scale.
    blocks_per_split, block_t, num_warps, num_stages : tuning knobs, 0 = heuristic
        (defaults from the H100 sweep in benchmarks/NOTES_kernels.md).
    pv_half : 1 = fp16 operands for the p @ C_v dot (exact int8, p rounded to fp16);
        0 = tf32; -1 (default) = 1, which measured 3-6% faster on H100.

    Returns
    -------
    out : [B, Hq, D] in q.dtype. Dots run in tf32 on GPU (fp32 in the interpreter), so
        expect ~1e-3 relative difference from the fp32 reference.
    """
    if not HAS_TRITON:
        raise RuntimeError(
            "spectral_kv.kernels.fused_decode needs triton (pip install triton); "
            f"import failed with: {_TRITON_IMPORT_ERROR!r}. "
            "Use fused_decode_reference for a pure-torch path."
        )
    _check_inputs(q, k_coeffs, k_scales, k_basis, v_coeffs, v_scales, v_basis,
                  n_cold, exact_k, exact_v, n_exact)
    args = (q, k_coeffs, k_scales, k_basis, v_coeffs, v_scales, v_basis,
            n_cold, exact_k, exact_v, n_exact, float(scaling),
            blocks_per_split, block_t, num_warps, num_stages, pv_half)
    if q.is_cuda and q.get_device() != torch.cuda.current_device():
        # Triton launches on the *current* device: a layer on another GPU (device_map split)
        # must make its own device current for the launch.
        with torch.cuda.device(q.device):
            return torch.ops.spectral_kv.fused_decode(*args)
    return torch.ops.spectral_kv.fused_decode(*args)
