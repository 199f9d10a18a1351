"""Triton kernels of `spectral_kv.kernels.quant_decode` (split-K partials + combine).

Kept apart from the op so each file reads in one sitting; the math, the layout constants and
the launch live in ``quant_decode.py``. Importing this module needs triton.

Constexpr layout descriptions (built by ``quant_decode._segments``), one flat int tuple per
segment (Triton 3.7 cannot index constexpr tuples nested deeper than two levels):
``(C, C_PAD, c0, col, NP, p_0, off_0, bit_0, tile_0, ..., p_2, off_2, bit_2, tile_2)``:
``C`` channels from channel ``c0`` of the role's kept components, padded to ``C_PAD``; ``col``
the segment's column in the value scales (unused for keys); ``NP <= 3`` planes, plane ``j`` of
``p_j`` bits starts at byte ``off_j`` of the block's buffer, holds bits ``bit_j..bit_j+p_j`` of
each code (``tile_j``: unused by the kernel; unused planes: 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["qd_partial_kernel", "qd_combine_kernel"]


@triton.jit
def _as_float(code):
    # int32 code < 2**23 -> its float32 value with one OR and one FSUB (no int->float convert):
    # OR-ing into the mantissa of 2**23 gives 2**23 + code exactly.
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _plane_bits(base, stride_x, rr, msk, offs_c, C: tl.constexpr, i, R_BASE: tl.constexpr,
                P_BASE: tl.constexpr, P: tl.constexpr, OFF: tl.constexpr, BIT: tl.constexpr):
    # Sub-index i of the smallest plane: plane P's tokens sit in its rows rr + R_BASE * (i % m)
    # at shift P * (i // m), m = P / P_BASE (codes.py docstring). The row tile is re-loaded
    # for each of its 8/P sub-indices back to back (L1 hits; DRAM reads each byte once):
    # keeping every plane's tiles live in registers across the sub-indices spilled (ptxas).
    k = i - (i // (P // P_BASE)) * (P // P_BASE)  # i % m (the interpreter's constexpr has no __rmod__)
    byte = OFF + (rr + R_BASE * k)[:, None] * C + offs_c[None, :]
    part = tl.load(base + byte.to(tl.int64) * stride_x, mask=msk, other=0).to(tl.int32)
    return ((part >> (P * (i // (P // P_BASE)))) & ((tl.constexpr(1) << P) - 1)) << BIT


@triton.jit
def _codes(base, stride_x, rr, r_ok, i, R_BASE: tl.constexpr, P_BASE: tl.constexpr,
           C: tl.constexpr, C_PAD: tl.constexpr, NP: tl.constexpr,
           P0: tl.constexpr, O0: tl.constexpr, B0: tl.constexpr, P1: tl.constexpr, O1: tl.constexpr,
           B1: tl.constexpr, P2: tl.constexpr, O2: tl.constexpr, B2: tl.constexpr):
    """Codes [BR, C_PAD] of one segment for tokens R_BASE * i + rr, as exact float32."""
    offs_c = tl.arange(0, C_PAD)
    msk = r_ok[:, None] & (offs_c < C)[None, :]
    code = _plane_bits(base, stride_x, rr, msk, offs_c, C, i, R_BASE, P_BASE, P0, O0, B0)
    if NP > 1:
        code = code | _plane_bits(base, stride_x, rr, msk, offs_c, C, i, R_BASE, P_BASE, P1, O1, B1)
    if NP > 2:
        code = code | _plane_bits(base, stride_x, rr, msk, offs_c, C, i, R_BASE, P_BASE, P2, O2, B2)
    return _as_float(code)


@triton.jit
def qd_partial_kernel(
    qk_ptr, q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, ncold_ptr,
    ek_ptr, ev_ptr, nexact_ptr,
    m_ptr, l_ptr, accc_ptr, acce_ptr,
    qk_scale,
    H, G, D, BPS, S_COLD, S_TOT,
    sqk_b, sqk_h, sqk_d,
    sq_b, sq_h, sq_d,
    skc_b, skc_h, skc_n, skc_x,
    sks_b, sks_h, sks_n, sks_g, sks_d,
    svc_b, svc_h, svc_n, svc_x,
    svs_b, svs_h, svs_n, svs_t, svs_s,
    sek_b, sek_h, sek_t, sek_d,
    sev_b, sev_h, sev_t, sev_d,
    KG: tl.constexpr, R_BASE: tl.constexpr, P_BASE: tl.constexpr, BR: tl.constexpr,
    KSEGS: tl.constexpr, VSEGS: tl.constexpr, KEY_BCAST: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    rows = (h * G + offs_g).to(tl.int64)  # the GQA group is the M dimension of every dot
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    ws = pid_bh.to(tl.int64) * S_TOT + split

    if split < S_COLD:
        qks = ()
        for si in tl.static_range(len(KSEGS)):
            offs_c = tl.arange(0, tl.constexpr(KSEGS[si][1]))
            qx = tl.load(qk_ptr + b * sqk_b + rows[:, None] * sqk_h + (KSEGS[si][2] + offs_c)[None, :] * sqk_d,
                        mask=g_ok[:, None] & (offs_c < KSEGS[si][0])[None, :], other=0.0)
            # scaling * log2(e) folded in once (the softmax runs on exp2); cast back because
            # Inductor passes the float argument as fp64.
            qks = qks + ((qx * qk_scale).to(tl.float32),)
        accs = ()
        zaccs = ()
        for si in tl.static_range(len(VSEGS)):
            accs = accs + (tl.zeros([G_PAD, tl.constexpr(VSEGS[si][1])], tl.float32),)
            zaccs = zaccs + (tl.zeros([G_PAD], tl.float32),)
        n_c = tl.load(ncold_ptr + b).to(tl.int64)
        blk_lo = split.to(tl.int64) * BPS
        blk_hi = tl.minimum(blk_lo + BPS, n_c)
        offs_r = tl.arange(0, BR)
        for n64 in range(blk_lo, blk_hi):  # int64: pool offsets cannot overflow
            kc_base = kc_ptr + b * skc_b + h * skc_h + n64 * skc_n
            vc_base = vc_ptr + b * svc_b + h * svc_h + n64 * svc_n
            ks_base = ks_ptr + b * sks_b + h * sks_h + n64 * sks_n
            kz_base = kz_ptr + b * sks_b + h * sks_h + n64 * sks_n
            vs_base = vs_ptr + b * svs_b + h * svs_h + n64 * svs_n
            vz_base = vz_ptr + b * svs_b + h * svs_h + n64 * svs_n
            for r0 in range(0, R_BASE, BR):
                rr = r0 + offs_r
                r_ok = rr < R_BASE  # only when R_BASE < BR (tiny blocks)
                for i in range(0, 8 // P_BASE):  # not unrolled: an unrolled body spilled (ptxas)
                    tok = R_BASE * i + rr  # BR consecutive tokens
                    s = tl.zeros([G_PAD, BR], tl.float32)
                    for si in tl.static_range(len(KSEGS)):
                        f = _codes(kc_base, skc_x, rr, r_ok, i, R_BASE, P_BASE, tl.constexpr(KSEGS[si][0]), tl.constexpr(KSEGS[si][1]), tl.constexpr(KSEGS[si][4]),
                                   tl.constexpr(KSEGS[si][5]), tl.constexpr(KSEGS[si][6]), tl.constexpr(KSEGS[si][7]), tl.constexpr(KSEGS[si][9]), tl.constexpr(KSEGS[si][10]), tl.constexpr(KSEGS[si][11]),
                                   tl.constexpr(KSEGS[si][13]), tl.constexpr(KSEGS[si][14]), tl.constexpr(KSEGS[si][15]))  # [BR, C_PAD] exact code values
                        offs_c = KSEGS[si][2] + tl.arange(0, tl.constexpr(KSEGS[si][1]))
                        c_ok = offs_c < KSEGS[si][2] + KSEGS[si][0]
                        if KEY_BCAST:  # the whole run lies in one key group: [C] vectors
                            grp = (R_BASE * i + r0) // KG
                            ks = tl.load(ks_base + grp * sks_g + offs_c * sks_d, mask=c_ok, other=0.0).to(tl.float32)
                            kz = tl.load(kz_base + grp * sks_g + offs_c * sks_d, mask=c_ok, other=0.0).to(tl.float32)
                            kx = f * ks[None, :] + kz[None, :]
                        else:  # runs that cross key groups (small blocks): per-token statistics
                            grp = (tok // KG).to(tl.int64)
                            msk = r_ok[:, None] & c_ok[None, :]
                            kst = grp[:, None] * sks_g + offs_c[None, :] * sks_d
                            kx = f * tl.load(ks_base + kst, mask=msk, other=0.0).to(tl.float32) \
                                + tl.load(kz_base + kst, mask=msk, other=0.0).to(tl.float32)
                        s += tl.dot(qks[si], tl.trans(kx))
                    s = tl.where(r_ok[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp2(m_i - m_new)
                    p = tl.exp2(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    new_accs = ()
                    new_zaccs = ()
                    for si in tl.static_range(len(VSEGS)):
                        fv = _codes(vc_base, svc_x, rr, r_ok, i, R_BASE, P_BASE, tl.constexpr(VSEGS[si][0]), tl.constexpr(VSEGS[si][1]), tl.constexpr(VSEGS[si][4]),
                                   tl.constexpr(VSEGS[si][5]), tl.constexpr(VSEGS[si][6]), tl.constexpr(VSEGS[si][7]), tl.constexpr(VSEGS[si][9]), tl.constexpr(VSEGS[si][10]), tl.constexpr(VSEGS[si][11]),
                                   tl.constexpr(VSEGS[si][13]), tl.constexpr(VSEGS[si][14]), tl.constexpr(VSEGS[si][15]))
                        st = tok.to(tl.int64) * svs_t + VSEGS[si][3] * svs_s
                        vs = tl.load(vs_base + st, mask=r_ok, other=0.0).to(tl.float32)
                        vz = tl.load(vz_base + st, mask=r_ok, other=0.0).to(tl.float32)
                        # per-token scale folded into p, zero into one row sum: no per-code multiply
                        new_accs = new_accs + (accs[si] * alpha[:, None] + tl.dot(p * vs[None, :], fv),)
                        new_zaccs = new_zaccs + (zaccs[si] * alpha + tl.sum(p * vz[None, :], axis=1),)
                    accs = new_accs
                    zaccs = new_zaccs
                    m_i = m_new
        for si in tl.static_range(len(VSEGS)):
            offs_c = tl.arange(0, tl.constexpr(VSEGS[si][1]))
            tl.store(accc_ptr + ws * (G_PAD * DV_PAD) + offs_g[:, None] * DV_PAD + (VSEGS[si][2] + offs_c)[None, :],
                     accs[si] + zaccs[si][:, None], mask=g_ok[:, None] & (offs_c < VSEGS[si][0])[None, :])
    else:
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        q = tl.load(q_ptr + b * sq_b + rows[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q = (q * qk_scale).to(tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        n_e = tl.load(nexact_ptr + b)
        ek_base = ek_ptr + b * sek_b + h * sek_h
        ev_base = ev_ptr + b * sev_b + h * sev_h
        for t0 in range(0, n_e, BLOCK_E):
            offs_t = t0 + tl.arange(0, BLOCK_E)
            t_ok = offs_t < n_e
            k = tl.load(ek_base + offs_t[:, None].to(tl.int64) * sek_t + offs_d[None, :] * sek_d,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(ev_base + offs_t[:, None].to(tl.int64) * sev_t + offs_d[None, :] * sev_d,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        tl.store(acce_ptr + pid_bh.to(tl.int64) * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD + offs_d[None, :], acc,
                 mask=g_ok[:, None])
    tl.store(m_ptr + ws * G_PAD + offs_g, m_i)
    tl.store(l_ptr + ws * G_PAD + offs_g, l_i)


@triton.jit
def qd_combine_kernel(
    m_ptr, l_ptr, accc_ptr, acce_ptr, outc_ptr, oute_ptr,
    H, G, D, DV, S_COLD, S_TOT,
    soc_b, soc_h, soc_d, soe_b, soe_h, soe_d,
    S_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
):
    # One program per (row, KV head): merges the splits' (max, sum, acc) partials with the one
    # joint denominator of cold and exact tokens (flash-decoding).
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_g = tl.arange(0, G_PAD)
    g_ok = offs_g < G
    base = pid_bh.to(tl.int64) * S_TOT
    s_ok = offs_s < S_TOT
    m = tl.load(m_ptr + (base + offs_s[:, None]) * G_PAD + offs_g[None, :], mask=s_ok[:, None], other=float("-inf"))
    m_g = tl.max(m, axis=0)
    m_g = tl.where(m_g == float("-inf"), 0.0, m_g)  # rows with no valid token: weights 0
    w = tl.exp2(m - m_g[None, :])
    lsum = tl.sum(w * tl.load(l_ptr + (base + offs_s[:, None]) * G_PAD + offs_g[None, :], mask=s_ok[:, None], other=0.0),
                  axis=0)
    inv = tl.where(lsum > 0, 1.0 / tl.maximum(lsum, 1e-30), 0.0)
    offs_v = tl.arange(0, DV_PAD)
    out_c = tl.zeros([G_PAD, DV_PAD], tl.float32)
    for s in range(0, S_COLD):
        w_s = tl.exp2(tl.load(m_ptr + (base + s) * G_PAD + offs_g) - m_g)
        a = tl.load(accc_ptr + (base + s) * (G_PAD * DV_PAD) + offs_g[:, None] * DV_PAD + offs_v[None, :],
                    mask=g_ok[:, None], other=0.0)
        out_c += a * w_s[:, None]
    rows = (h * G + offs_g).to(tl.int64)
    tl.store(outc_ptr + b * soc_b + rows[:, None] * soc_h + offs_v[None, :] * soc_d, out_c * inv[:, None],
             mask=g_ok[:, None] & (offs_v < DV)[None, :])
    offs_d = tl.arange(0, D_PAD)
    w_e = tl.exp2(tl.load(m_ptr + (base + S_COLD) * G_PAD + offs_g) - m_g)
    a = tl.load(acce_ptr + pid_bh.to(tl.int64) * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    tl.store(oute_ptr + b * soe_b + rows[:, None] * soe_h + offs_d[None, :] * soe_d, a * (w_e * inv)[:, None],
             mask=g_ok[:, None] & (offs_d < D)[None, :])
