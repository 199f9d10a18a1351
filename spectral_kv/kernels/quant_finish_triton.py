"""The two `tl` kernels around the Gluon cold kernel on `quant_decode`'s Gluon path
(`quant_decode_gluon_path`): the query rotation before it and the "finish" after it.

``qd_query_kernel``: ``qk = q @ R_k[:Dk]ᵀ`` in fp32 (``tf32x3``), one program per (row, KV head,
CH key channels): one launch where torch needed three (cast, basis cast, matmul).

``qd_finish_kernel``: the Gluon kernel leaves split-K partials of the cold blocks, ``m, l``
(running max / sum, log2 units, ``scaling * log2(e)`` folded in) and ``acc`` (the unnormalized
value sum in the VALUE basis, Dv wide), each (row, KV head)'s splits contiguous as ``S * G`` rows
(split-major, ``r = s * G + g``). One program per (row, KV head, CH output columns) then

1. merges the cold rows RB at a time with an online max: the weights ``w[g, r] = exp2(m[r] -
   m_run[g])`` for ``r % G == g`` (else 0) form a [G_PAD, RB] matrix, so the merge is one
   tensor-core dot per chunk, ``W @ acc[r0:r0 + RB]`` (``tf32x3``, ~fp32). The previous form
   summed one split's [G_PAD, Dv] tile per iteration after a separate max pass: ~2 S dependent
   loads. H200 (`benchmarks/results/gluon_decode_H200.txt`, 68 exact tokens): 12.2 / 16.5 / 23.5
   us at 1 x 4K / 8 x 32K / 16 x 32K, where rotation + finish took ~31 us at 1 x 4K before;
2. attends to the exact tail in the model's basis (`exact_tail`: q and exact_k / exact_v,
   ``n_exact`` tokens, BLOCK_E at a time);
3. joins both by one denominator and maps the cold sum to the model's basis once,
   ``cold @ R_v[:Dv]`` (``tf32x3``): linear, so it commutes with the merge; identity (``ROT_V``
   false): value channel c is output column c, columns >= Dv get no cold contribution;
4. writes the normalized output in q's dtype (rows with no token: zeros).
Importing this module needs triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .exact_tail_triton import exact_tail

__all__ = ["qd_query_kernel", "qd_finish_kernel"]


@triton.jit
def qd_query_kernel(
    q_ptr, rk_ptr, qk_ptr, H, D, DK,
    sq_b, sq_h, sq_d, srk_b, srk_h, srk_r, srk_d, sqk_b, sqk_h,
    G: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, CH: tl.constexpr,
):
    """Program (row * H + head, key-channel chunk): qk [B, Hq, DK] fp32 (last dim contiguous) =
    q [B, Hq, D] (any float dtype) @ rk[b, h, :DK]ᵀ (rk [B, H, R, D], any float dtype, stride-0 dims)."""
    pid_bh = tl.program_id(0)
    c0 = tl.program_id(1) * CH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_c = c0 + tl.arange(0, CH)
    rows = h * G + offs_g
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=(offs_g < G)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    r = tl.load(rk_ptr + b * srk_b + h * srk_h + offs_c[:, None] * srk_r + offs_d[None, :] * srk_d,
                mask=(offs_c < DK)[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    qk = tl.dot(q, tl.trans(r), input_precision="tf32x3")
    tl.store(qk_ptr + b * sqk_b + rows[:, None] * sqk_h + offs_c[None, :], qk,
             mask=(offs_g < G)[:, None] & (offs_c < DK)[None, :])


@triton.jit
def _merge_rows(rr, mr, lr, a, m_c, l_c, cold, offs_g, G: tl.constexpr):
    """One merge step: rows ``rr`` [RB] (row r = split r // G, head r % G) with their max ``mr``, sum
    ``lr`` [RB] and value sums ``a`` [RB, columns] into the running (m_c, l_c [G_PAD], cold)."""
    mine = (rr % G)[None, :] == offs_g[:, None]  # [G_PAD, RB]: row r belongs to query head r % G
    m_new = tl.maximum(m_c, tl.max(tl.where(mine, mr[None, :], float("-inf")), axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no token yet: every weight 0
    w = tl.where(mine, tl.exp2(mr[None, :] - m_safe[:, None]), 0.0)  # [G_PAD, RB]
    alpha = tl.exp2(m_c - m_safe)
    l_c = l_c * alpha + tl.sum(w * lr[None, :], axis=1)
    cold = cold * alpha[:, None] + tl.dot(w, a, input_precision="tf32x3")
    return m_new, l_c, cold


# The number of cold splits changes with the context: not specialized on (a recompile each time
# it becomes 1 or a multiple of 16).
@triton.jit(do_not_specialize=["S"])
def qd_finish_kernel(
    q_ptr, rv_ptr, ek_ptr, ev_ptr, nexact_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    qk_scale, H, D, S,
    sq_b, sq_h, sq_d,
    srv_b, srv_h, srv_r, srv_d,
    sek_b, sek_h, sek_t, sek_d,
    sev_b, sev_h, sev_t, sev_d,
    sm_b, sm_h, sa_b, sa_h,
    so_b, so_h, so_d,
    G: tl.constexpr, ROT_V: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, G_PAD: tl.constexpr,
    D_PAD: tl.constexpr, CH: tl.constexpr, BLOCK_E: tl.constexpr, RB: tl.constexpr,
):
    """Program (row * H + head, column chunk). Reads q [B, Hq, D] and exact_k / exact_v [B, H, Te, D]
    (q's dtype), rv [B, H, R, D] (any float dtype; unread when ROT_V is false), m / l fp32
    [B, H, S, G] and acc fp32 [B, H, S, G, DV] (both contiguous within a (row, head): rows
    ``s * G + g``, m and l with one stride set); writes out [B, Hq, D] in its dtype."""
    pid_bh = tl.program_id(0)
    c0 = tl.program_id(1) * CH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    rows = (h * G + offs_g).to(tl.int64)
    offs_c = c0 + tl.arange(0, CH)  # this program's output columns
    c_ok = offs_c < D
    m_base = m_ptr + b * sm_b + h * sm_h
    l_base = l_ptr + b * sm_b + h * sm_h
    a_base = acc_ptr + b * sa_b + h * sa_h
    ek_base = ek_ptr + b * sek_b + h * sek_h
    ev_base = ev_ptr + b * sev_b + h * sev_h
    # with a basis every value channel feeds every column (the whole Dv is summed and rotated), the
    # identity needs only this program's columns
    if ROT_V:
        offs_a = tl.arange(0, DV_PAD)
    else:
        offs_a = offs_c
    a_ok = offs_a < DV
    offs_r = tl.arange(0, RB)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    n_rows = S * G
    n_e = tl.load(nexact_ptr + b)

    # the value basis first: its load does not wait on the loops below
    if ROT_V:
        r = tl.load(rv_ptr + b * srv_b + h * srv_h + offs_a[:, None] * srv_r + offs_c[None, :] * srv_d,
                    mask=a_ok[:, None] & c_ok[None, :], other=0.0)

    # 1. the cold rows, RB at a time, online max across steps (one step in the common case)
    m_c = tl.full([G_PAD], float("-inf"), tl.float32)
    l_c = tl.zeros([G_PAD], tl.float32)
    cold = tl.zeros([G_PAD, DV_PAD if ROT_V else CH], tl.float32)
    for r0 in range(0, n_rows, RB):
        rr = r0 + offs_r
        r_ok = rr < n_rows
        mr = tl.load(m_base + rr, mask=r_ok, other=float("-inf"))
        lr = tl.load(l_base + rr, mask=r_ok, other=0.0)
        a = tl.load(a_base + rr[:, None] * DV + offs_a[None, :], mask=r_ok[:, None] & a_ok[None, :], other=0.0)
        m_c, l_c, cold = _merge_rows(rr, mr, lr, a, m_c, l_c, cold, offs_g, G)

    # 2. the exact tail in the model's basis (`exact_tail`, the tl partial kernel's loop); the scores
    # need all of D (at ~68 tokens recomputing them per column chunk is cheap)
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q = (q * qk_scale).to(tl.float32)  # Inductor passes the float as fp64
    m_e = tl.full([G_PAD], float("-inf"), tl.float32)
    l_e = tl.zeros([G_PAD], tl.float32)
    acc_e = tl.zeros([G_PAD, CH], tl.float32)
    m_e, l_e, acc_e = exact_tail(q, ek_base, ev_base, n_e, sek_t, sek_d, sev_t, sev_d, offs_d, d_ok, offs_c, c_ok,
                                 m_e, l_e, acc_e, BLOCK_E)

    # 3. one denominator for both
    m_g = tl.maximum(m_c, m_e)
    m_g = tl.where(m_g == float("-inf"), 0.0, m_g)  # rows with no valid token: every weight 0
    w_e = tl.exp2(m_e - m_g)
    w_c = tl.exp2(m_c - m_g)
    den = l_e * w_e + l_c * w_c
    if ROT_V:  # back to the model's basis once: [G_PAD, Dv] @ R_v[:Dv, columns]
        # fp32 operands at ~fp32 accuracy (3 tf32 passes), as the tl kernel's rotations
        cold = tl.dot(cold, r.to(tl.float32), input_precision="tf32x3")
    inv = tl.where(den > 0, 1.0 / tl.maximum(den, 1e-30), 0.0)
    out = (acc_e * w_e[:, None] + cold * w_c[:, None]) * inv[:, None]
    tl.store(out_ptr + b * so_b + rows[:, None] * so_h + offs_c[None, :] * so_d, out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & c_ok[None, :])
