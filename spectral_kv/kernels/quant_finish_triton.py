"""The "finish" kernel of `quant_decode`'s Gluon path (`quant_decode_gluon_path`): exact tail + merge.

The Gluon cold kernel (`quant_decode_gluon.cold_partials`) leaves split-K partials of the cold
blocks: ``m, l`` (running max / sum, log2 units, ``scaling * log2(e)`` folded in) and ``acc`` (the
unnormalized value sum in the VALUE basis, Dv wide). One program per (batch row, KV head, CH output
columns) of this kernel then

1. attends to the exact tail in the model's basis with the `tl` partial kernel's exact-program
   online softmax (q and exact_k / exact_v, ``n_exact`` tokens, BLOCK_E at a time);
2. merges it with every cold split by one joint denominator (flash-decoding);
3. maps the cold sum to the model's basis once, ``acc_cold @ R_v[:Dv]`` (fp32 at ~fp32 accuracy,
   ``tf32x3``): linear, so it commutes with the merge's rescale-and-sum; identity (``ROT_V``
   false): value channel c is output column c, columns >= Dv get no cold contribution;
4. writes the normalized output in q's dtype (rows with no token: zeros).

So the Gluon path is three launches (the query rotation in torch, the Gluon partials, this), where
a torch combine cost 34-40 us a step on the H200 (`benchmarks/results/gluon_decode_H200.txt`).
Importing this module needs triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .exact_tail_triton import exact_tail

__all__ = ["qd_finish_kernel"]


# The number of cold splits changes with the context: not specialized on (a recompile each time
# it becomes 1 or a multiple of 16).
@triton.jit(do_not_specialize=["S"])
def qd_finish_kernel(
    q_ptr, rv_ptr, ek_ptr, ev_ptr, nexact_ptr, m_ptr, l_ptr, acc_ptr, out_ptr,
    qk_scale, H, G, D, S,
    sq_b, sq_h, sq_d,
    srv_b, srv_h, srv_r, srv_d,
    sek_b, sek_h, sek_t, sek_d,
    sev_b, sev_h, sev_t, sev_d,
    sm_b, sm_h, sm_s, sm_g,
    sa_b, sa_h, sa_s, sa_g, sa_c,
    so_b, so_h, so_d,
    ROT_V: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
    CH: tl.constexpr, BLOCK_E: tl.constexpr, SB: tl.constexpr,
):
    """Program (row * H + head, column chunk). Reads q [B, Hq, D] and exact_k / exact_v [B, H, Te, D]
    (q's dtype), rv [B, H, R, D] (any float dtype; unread when ROT_V is false), m / l fp32
    [B, H, S, G] (one stride set) and acc fp32 [B, H, S, G, DV]; writes out [B, Hq, D] in its dtype."""
    pid_bh = tl.program_id(0)
    c0 = tl.program_id(1) * CH
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    rows = (h * G + offs_g).to(tl.int64)
    offs_c = c0 + tl.arange(0, CH)  # this program's output columns
    offs_sb = tl.arange(0, SB)
    m_base = m_ptr + b * sm_b + h * sm_h
    l_base = l_ptr + b * sm_b + h * sm_h

    # the cold splits' joint max first: the merge below then reads each split once
    m_c = tl.full([G_PAD], float("-inf"), tl.float32)
    for s0 in range(0, S, SB):
        ss = s0 + offs_sb
        mm = tl.load(m_base + ss[:, None] * sm_s + offs_g[None, :] * sm_g, mask=(ss < S)[:, None] & g_ok[None, :],
                     other=float("-inf"))
        m_c = tl.maximum(m_c, tl.max(mm, axis=0))

    # the exact tail: the tl partial kernel's exact program, restricted to CH value columns
    # (the scores need all of D; at ~68 tokens recomputing them per column chunk is cheap)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    q = (q * qk_scale).to(tl.float32)  # Inductor passes the float as fp64
    m_e = tl.full([G_PAD], float("-inf"), tl.float32)
    l_e = tl.zeros([G_PAD], tl.float32)
    acc_e = tl.zeros([G_PAD, CH], tl.float32)
    n_e = tl.load(nexact_ptr + b)
    ek_base = ek_ptr + b * sek_b + h * sek_h
    ev_base = ev_ptr + b * sev_b + h * sev_h
    m_e, l_e, acc_e = exact_tail(q, ek_base, ev_base, n_e, sek_t, sek_d, sev_t, sev_d, offs_d, d_ok, offs_c, offs_c < D,
                                 m_e, l_e, acc_e, BLOCK_E)

    m_g = tl.maximum(m_c, m_e)
    m_g = tl.where(m_g == float("-inf"), 0.0, m_g)  # rows with no valid token: every weight 0
    w_e = tl.exp2(m_e - m_g)
    den = l_e * w_e
    # the cold sum: with a basis every value channel feeds every column (the whole Dv is summed and
    # rotated), the identity needs only this program's columns
    if ROT_V:
        offs_a = tl.arange(0, DV_PAD)
    else:
        offs_a = offs_c
    a_ok = offs_a < DV
    a_base = acc_ptr + b * sa_b + h * sa_h
    cold = tl.zeros([G_PAD, DV_PAD if ROT_V else CH], tl.float32)
    for s0 in range(0, S, SB):
        ss = s0 + offs_sb
        s_ok = ss < S
        st = ss[:, None] * sm_s + offs_g[None, :] * sm_g
        sg_ok = s_ok[:, None] & g_ok[None, :]
        w_s = tl.exp2(tl.load(m_base + st, mask=sg_ok, other=float("-inf")) - m_g[None, :])  # [SB, G_PAD]
        den += tl.sum(w_s * tl.load(l_base + st, mask=sg_ok, other=0.0), axis=0)
        a = tl.load(a_base + ss[:, None, None] * sa_s + offs_g[None, :, None] * sa_g + offs_a[None, None, :] * sa_c,
                    mask=sg_ok[:, :, None] & a_ok[None, None, :], other=0.0)
        cold += tl.sum(a * w_s[:, :, None], axis=0)
    if ROT_V:  # back to the model's basis once: [G_PAD, Dv] @ R_v[:Dv, columns]
        r = tl.load(rv_ptr + b * srv_b + h * srv_h + offs_a[:, None] * srv_r + offs_c[None, :] * srv_d,
                    mask=a_ok[:, None] & (offs_c < D)[None, :], other=0.0).to(tl.float32)
        # fp32 operands at ~fp32 accuracy (3 tf32 passes), as the tl kernel's rotations
        cold = tl.dot(cold, r, input_precision="tf32x3")
    inv = tl.where(den > 0, 1.0 / tl.maximum(den, 1e-30), 0.0)
    out = (acc_e * w_e[:, None] + cold) * inv[:, None]
    tl.store(out_ptr + b * so_b + rows[:, None] * so_h + offs_c[None, :] * so_d, out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & (offs_c < D)[None, :])
