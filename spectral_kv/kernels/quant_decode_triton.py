"""Triton kernels of `spectral_kv.kernels.quant_decode` (split-K partials + combine).

This module is longer than ~350 lines: the partial kernel (unit loop, the two rotations, the
exact tail, the byte value statistics) and its combine are one launch pair read together; the
exact-tail loop is shared with the finish and SVD kernels (`exact_tail_triton`).

Kept apart from the op so each file reads in one sitting; the math, the layout constants and
the launch live in ``quant_decode.py``. Importing this module needs triton.

The partial kernel takes the model-dtype query and both bases (``ROT_K`` / ``ROT_V``; false:
identity): a cold program rotates its query per key segment before the units and maps its value
accumulators back to the model's basis after them, so every split's partial (``acc_ptr``, one
``[G_PAD, D_PAD]`` slot per split, the exact tail's last) is D wide; the combine kernel sums the
slots with the joint softmax weights and writes the output in q's dtype.

Codes are read as uint8 tiles ``[rows, channels]`` of each plane. A chunk's codes (bits
``[SH, SH+P)`` of plane bytes moved to ``[BIT, BIT+P)``, ORed over the planes) become the dots'
fp16 operands in one of the kernel's ``FORM``s (`spectral_kv.kernels.quant_unpack`):

* 2, the default on CUDA: one inline-PTX op per 4 channels (Triton packs 4 bytes in one 32-bit
  register): a shift and a mask per plane on all 4 codes at once, then two ``prmt`` that put
  each code byte under a zero exponent byte, i.e. the fp16 subnormal ``code * 2**-24`` with no
  int->float convert (BitDecoding's / Marlin's trick, with the exponent left at zero). The dots
  accumulate in code steps; scores and value sums are scaled back once (``INV``).
* 1: the same under the exponent byte 0x64, the value ``1024 + code``. The offset is not
  subtracted per code: it is folded into the key bias (``- 1024 * sum(q * s_k)``) and the value
  zero sum (``- 1024 * sum(p * s_v)``), both from the same fp16-rounded operands the dots see.
* 0 (``unpack="triton"``, fp32 operands): the same bits with Triton integer ops on each byte,
  then a convert. The interpreter, which cannot run PTX, runs forms 1 and 2 as their bit
  patterns built with Triton ops (``EMU``).

The PTX op is marked impure on purpose: a pure one lets Triton move the layout conversion to the
dot operand ahead of it, onto the bytes, which sm_90 then gathers with byte-wide shared loads
(`benchmarks/quant_decode_compile.py`'s SASS: 263 LDS per unit instead of 88).

Constexpr layout descriptions (built by ``quant_decode._segments``), one flat int tuple per
segment (Triton cannot index constexpr tuples nested deeper than two levels):
``(C, C_PAD, c0, col, NP, p_0, off_0, bit_0, tile_0, ..., p_2, off_2, bit_2, tile_2)``:
``C`` channels from channel ``c0`` of the role's kept components, padded to ``C_PAD``; ``col``
the segment's column in the value scales (unused for keys); ``NP <= 3`` planes, plane ``j`` of
``p_j`` bits starts at BYTE ``off_j`` of the block's buffer, holds bits ``bit_j..bit_j+p_j`` of
each code, and its ``p_j / P_BASE`` row tiles of a unit are entries ``tile_j ..`` of the role's
tile tuple (unused planes: 0). ``KASM`` / ``VASM``: the chunk strings, ``[segment * chunks + i]``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .exact_tail_triton import exact_tail

__all__ = ["qd_partial_kernel", "qd_combine_kernel"]


@triton.jit
def _tile_of(tiles, I: tl.constexpr, TILE: tl.constexpr, P: tl.constexpr, P_BASE: tl.constexpr):
    # Chunk I: plane P's tokens sit in its row tile I % m at shift P * (I // m), m = P / P_BASE
    # (codes.py docstring); `I - (I // m) * m`: the interpreter's constexpr has no __rmod__.
    return tiles[TILE + I - (I // (P // P_BASE)) * (P // P_BASE)]


@triton.jit
def _bits(tiles, I: tl.constexpr, TILE: tl.constexpr, P: tl.constexpr, BIT: tl.constexpr, P_BASE: tl.constexpr):
    """Plane P's bits of chunk I, moved to bits [BIT, BIT + P) of each code (int32 per byte)."""
    x = _tile_of(tiles, I, TILE, P, P_BASE).to(tl.int32)
    if P < 8:
        x = ((x >> (P * (I // (P // P_BASE)))) & ((1 << P) - 1)) << BIT
    return x


@triton.jit
def _codes(tiles, I: tl.constexpr, NP: tl.constexpr, P0: tl.constexpr, B0: tl.constexpr, T0: tl.constexpr,
           P1: tl.constexpr, B1: tl.constexpr, T1: tl.constexpr, P2: tl.constexpr, B2: tl.constexpr, T2: tl.constexpr,
           P_BASE: tl.constexpr, FORM: tl.constexpr, EMU: tl.constexpr, CODE: tl.constexpr, DT: tl.constexpr):
    """Chunk I's codes of one segment [rows, C_PAD] in the kernel's FORM: 0 ``code`` in ``DT``;
    1 / 2 fp16 ``1024 + code`` / ``code * 2**-24`` from the PTX string ``CODE`` (``EMU``: the same
    bit patterns from Triton ops, for the interpreter, which cannot run PTX)."""
    if FORM > 0 and not EMU:
        if NP == 1:
            f = tl.inline_asm_elementwise(CODE, "=r,=r,r", [_tile_of(tiles, I, T0, P0, P_BASE)],
                                          dtype=tl.float16, is_pure=False, pack=4)
        elif NP == 2:
            f = tl.inline_asm_elementwise(CODE, "=r,=r,r,r", [_tile_of(tiles, I, T0, P0, P_BASE),
                                                              _tile_of(tiles, I, T1, P1, P_BASE)],
                                          dtype=tl.float16, is_pure=False, pack=4)
        else:
            f = tl.inline_asm_elementwise(CODE, "=r,=r,r,r,r", [_tile_of(tiles, I, T0, P0, P_BASE),
                                                                _tile_of(tiles, I, T1, P1, P_BASE),
                                                                _tile_of(tiles, I, T2, P2, P_BASE)],
                                          dtype=tl.float16, is_pure=False, pack=4)
    else:
        w = _bits(tiles, I, T0, P0, B0, P_BASE)
        if NP > 1:
            w = w | _bits(tiles, I, T1, P1, B1, P_BASE)
        if NP > 2:
            w = w | _bits(tiles, I, T2, P2, B2, P_BASE)
        if FORM > 0:
            f = (w | (0x6400 if FORM == 1 else 0)).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            f = w.to(DT)
    return f


@triton.jit
def _load_tiles(tiles, base, SEG_C: tl.constexpr, SEG_CPAD: tl.constexpr, NP: tl.constexpr,
                P0: tl.constexpr, O0: tl.constexpr, P1: tl.constexpr, O1: tl.constexpr, P2: tl.constexpr, O2: tl.constexpr,
                rr, r_ok, R_BASE: tl.constexpr, P_BASE: tl.constexpr):
    # plane j's tiles k: rows rr + R_BASE * k of the plane ([R_p, C] bytes from byte O_j)
    offs_c = tl.arange(0, SEG_CPAD)
    msk = r_ok[:, None] & (offs_c < SEG_C)[None, :]
    for k in tl.static_range(P0 // P_BASE):
        tiles = tiles + (tl.load(base + O0 + (rr + R_BASE * k)[:, None] * SEG_C + offs_c[None, :], mask=msk, other=0),)
    if NP > 1:
        for k in tl.static_range(P1 // P_BASE):
            tiles = tiles + (tl.load(base + O1 + (rr + R_BASE * k)[:, None] * SEG_C + offs_c[None, :], mask=msk, other=0),)
    if NP > 2:
        for k in tl.static_range(P2 // P_BASE):
            tiles = tiles + (tl.load(base + O2 + (rr + R_BASE * k)[:, None] * SEG_C + offs_c[None, :], mask=msk, other=0),)
    return tiles


# Counts that change with the context (units per split, splits) are not specialized on: Triton
# would compile a new variant whenever one becomes 1 or a multiple of 16 (a ~15-90 s compile in
# the middle of decoding, once per variant and machine).
@triton.jit(do_not_specialize=["TPS", "S_COLD", "S_TOT"])
def qd_partial_kernel(
    q_ptr, rk_ptr, rv_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, ncold_ptr,
    ek_ptr, ev_ptr, nexact_ptr,
    m_ptr, l_ptr, acc_ptr,
    qk_scale,
    H, G, D, TPS, S_COLD, S_TOT,
    sq_b, sq_h, sq_d,
    srk_b, srk_h, srk_r, srk_d,
    srv_b, srv_h, srv_r, srv_d,
    skc_b, skc_h, skc_n,
    sks_b, sks_h, sks_n, sks_g, sks_d,
    svc_b, svc_h, svc_n,
    svs_b, svs_h, svs_n, svs_t, svs_s,
    sek_b, sek_h, sek_t, sek_d,
    sev_b, sev_h, sev_t, sev_d,
    KG: tl.constexpr, R_BASE: tl.constexpr, P_BASE: tl.constexpr, BR: tl.constexpr, NR: tl.constexpr,
    KSEGS: tl.constexpr, VSEGS: tl.constexpr, KASM: tl.constexpr, VASM: tl.constexpr, FORM: tl.constexpr,
    MAGIC: tl.constexpr, INV: tl.constexpr, SINV: tl.constexpr, EMU: tl.constexpr,
    KEY_BCAST: tl.constexpr, KSTEP: tl.constexpr, F16: tl.constexpr,
    G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
    ROT_K: tl.constexpr, ROT_V: tl.constexpr, DV: tl.constexpr, DC: tl.constexpr,
    VBYTE: tl.constexpr = False,
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
    # FORM (quant_decode._impl): 0 Triton integer ops, codes as they are; 1 PTX, fp16 1024 + code;
    # 2 PTX, fp16 subnormals code * 2**-24. MAGIC: what a code carries on top of its value; INV:
    # 1 / the value of one code step (the dots accumulate in code steps, rescaled once after);
    # SINV: the same for the score accumulators (1 on the per-token key path, which dequantizes).

    if split < S_COLD:
        n_c = tl.load(ncold_ptr + b).to(tl.int64)
        u_lo = split.to(tl.int64) * TPS
        u_hi = tl.minimum(u_lo + TPS, n_c * NR)
        # A split with no unit (a short row, a static pool's spare slots) only stores zeros:
        # its basis and query loads are masked off, so it reads no memory for them.
        live = u_lo < u_hi
        # What the value rotation after the loop needs, made here as one int and one pointer:
        # keeping b, h and `live` alive through the loop instead cost spills in it (sm_90).
        d_lim = tl.where(live, D, 0)
        rv_base = rv_ptr + b * srv_b + h * srv_h
        q_base = q_ptr + b * sq_b + rows[:, None] * sq_h
        qks = ()
        for si in tl.static_range(len(KSEGS)):
            offs_c = tl.arange(0, tl.constexpr(KSEGS[si][1]))
            c_ok = offs_c < KSEGS[si][0]
            if ROT_K:  # the segment's query in the key basis, q @ R_k[c0:c0+C]^T, DC columns of D at a time
                qx = tl.zeros([G_PAD, tl.constexpr(KSEGS[si][1])], tl.float32)
                for dc in tl.static_range(D_PAD // DC):
                    offs_x = dc * DC + tl.arange(0, DC)
                    x_ok = (offs_x < D) & live
                    qd = tl.load(q_base + offs_x[None, :] * sq_d, mask=g_ok[:, None] & x_ok[None, :], other=0.0)
                    r = tl.load(rk_ptr + b * srk_b + h * srk_h + (KSEGS[si][2] + offs_c)[:, None] * srk_r
                                + offs_x[None, :] * srk_d, mask=c_ok[:, None] & x_ok[None, :], other=0.0).to(tl.float32)
                    # fp32 operands at ~fp32 accuracy (3 tf32 passes): tf32 alone would round the
                    # query to 10 bits, more than the fp16 operands of the unit loop lose
                    qx = tl.dot(qd.to(tl.float32), tl.trans(r), qx, input_precision="tf32x3")
            else:  # identity basis: the kept channels are the query's first columns
                qx = tl.load(q_base + (KSEGS[si][2] + offs_c)[None, :] * sq_d,
                             mask=g_ok[:, None] & (c_ok & live)[None, :], other=0.0).to(tl.float32)
            # scaling * log2(e) folded in once (the softmax runs on exp2); cast back because
            # Inductor passes the float argument as fp64.
            qks = qks + ((qx * qk_scale).to(tl.float32),)
        accs = ()
        zaccs = ()  # per value segment: sum_t p_t * (z_t - MAGIC * s_t), per token column (one reduction at the end)
        for si in tl.static_range(len(VSEGS)):
            accs = accs + (tl.zeros([G_PAD, tl.constexpr(VSEGS[si][1])], tl.float32),)
            zaccs = zaccs + (tl.zeros([G_PAD, BR], tl.float32),)
        l_t = tl.zeros([G_PAD, BR], tl.float32)  # the softmax sum, likewise
        offs_r = tl.arange(0, BR)
        # One unit = rows r0..r0+BR-1 of the smallest plane of one block: 8 / P_BASE chunks of
        # BR consecutive tokens (chunk i: tokens R_BASE * i + r0 + 0..BR-1).
        for u in range(u_lo, u_hi):  # int64: pool offsets cannot overflow
            n64 = u // NR
            r0 = (u - n64 * NR) * BR
            rr = r0 + offs_r
            r_ok = rr < R_BASE  # only when R_BASE < BR (tiny blocks)
            kc_base = kc_ptr + b * skc_b + h * skc_h + n64 * skc_n
            vc_base = vc_ptr + b * svc_b + h * svc_h + n64 * svc_n
            ks_base = ks_ptr + b * sks_b + h * sks_h + n64 * sks_n
            kz_base = kz_ptr + b * sks_b + h * sks_h + n64 * sks_n
            vs_base = vs_ptr + b * svs_b + h * svs_h + n64 * svs_n
            vz_base = vz_ptr + b * svs_b + h * svs_h + n64 * svs_n
            # Every byte of the unit is loaded once, up front (one memory latency per unit, not
            # one per chunk): tile KSEGS[si][8 + 4j] + k holds plane j's rows rr + R_BASE * k.
            kt = ()
            for si in tl.static_range(len(KSEGS)):
                kt = _load_tiles(kt, kc_base, KSEGS[si][0], KSEGS[si][1], KSEGS[si][4], KSEGS[si][5], KSEGS[si][6],
                                 KSEGS[si][9], KSEGS[si][10], KSEGS[si][13], KSEGS[si][14], rr, r_ok, R_BASE, P_BASE)
            vt = ()
            for si in tl.static_range(len(VSEGS)):
                vt = _load_tiles(vt, vc_base, VSEGS[si][0], VSEGS[si][1], VSEGS[si][4], VSEGS[si][5], VSEGS[si][6],
                                 VSEGS[si][9], VSEGS[si][10], VSEGS[si][13], VSEGS[si][14], rr, r_ok, R_BASE, P_BASE)
            # scores of every chunk: s = (q * s_k) . code + q . z_k, the key scale folded into
            # the query per key group, so a code costs its unpacking only
            ss = ()
            for i in tl.static_range(8 // P_BASE):
                ss = ss + (tl.zeros([G_PAD, BR], tl.float32),)
            for si in tl.static_range(len(KSEGS)):
                offs_c = tl.arange(0, tl.constexpr(KSEGS[si][1]))
                c_ok = offs_c < KSEGS[si][0]
                new_ss = ()
                for i in tl.static_range(8 // P_BASE):
                    f = _codes(kt, i, KSEGS[si][4], KSEGS[si][5], KSEGS[si][7], KSEGS[si][8],
                               KSEGS[si][9], KSEGS[si][11], KSEGS[si][12], KSEGS[si][13], KSEGS[si][15], KSEGS[si][16],
                               P_BASE, FORM, EMU, tl.constexpr(KASM[si * (8 // P_BASE) + i] if FORM > 0 else ""), tl.float16 if F16 else tl.float32)
                    s = ss[i]
                    if KEY_BCAST:  # the chunk lies in one key group: [C] statistics
                        if i - (i // KSTEP) * KSTEP == 0:  # chunks i .. i+KSTEP-1 share the group
                            grp = (R_BASE * i + r0) // KG
                            st = grp * sks_g + (KSEGS[si][2] + offs_c) * sks_d
                            ks = tl.load(ks_base + st, mask=c_ok, other=0.0).to(tl.float32)
                            kz = tl.load(kz_base + st, mask=c_ok, other=0.0).to(tl.float32)
                            qs = (qks[si] * ks[None, :]).to(tl.float16 if F16 else tl.float32)
                            # q . z_k in fp32, one reduction per group, less the codes' offset
                            # times the same rounded q * s_k the dot multiplies it with
                            if MAGIC != 0.0:
                                bias = tl.sum(qks[si] * kz[None, :] - MAGIC * qs.to(tl.float32), axis=1)
                            else:
                                bias = tl.sum(qks[si] * kz[None, :], axis=1)
                        s = tl.dot(qs, tl.trans(f), s) + (bias * (1.0 / INV))[:, None]
                    else:  # chunks that cross key groups (small blocks): per-token statistics
                        grp = ((R_BASE * i + rr) // KG).to(tl.int64)
                        st = grp[:, None] * sks_g + (KSEGS[si][2] + offs_c)[None, :] * sks_d
                        msk = r_ok[:, None] & c_ok[None, :]
                        kx = (f.to(tl.float32) * INV - MAGIC) * tl.load(ks_base + st, mask=msk, other=0.0).to(tl.float32) \
                            + tl.load(kz_base + st, mask=msk, other=0.0).to(tl.float32)
                        s = tl.dot(qks[si].to(tl.float16 if F16 else tl.float32), tl.trans(kx.to(tl.float16 if F16 else tl.float32)), s)
                    new_ss = new_ss + (s,)
                ss = new_ss
            # one online-softmax step per unit, one cross-thread reduction (the max)
            # (the accumulators hold scores / SINV > 0: the max commutes, the scale rides in one FMA)
            mx = ss[0]
            for i in tl.static_range(1, 8 // P_BASE):
                mx = tl.maximum(mx, ss[i])
            if R_BASE < BR:
                mx = tl.where(r_ok[None, :], mx, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(mx, axis=1) * SINV)
            alpha = tl.exp2(m_i - m_new)
            l_t = l_t * alpha[:, None]
            ps = ()
            for i in tl.static_range(8 // P_BASE):
                p = tl.exp2(ss[i] * SINV - m_new[:, None])
                if R_BASE < BR:
                    p = tl.where(r_ok[None, :], p, 0.0)
                l_t += p
                ps = ps + (p,)
            m_i = m_new
            # values: the per-token scale folded into p, the zero (less the codes' offset) into one row sum
            new_accs = ()
            new_zaccs = ()
            for si in tl.static_range(len(VSEGS)):
                acc = accs[si] * alpha[:, None]
                zacc = zaccs[si] * alpha[:, None]
                for i in tl.static_range(8 // P_BASE):
                    f = _codes(vt, i, VSEGS[si][4], VSEGS[si][5], VSEGS[si][7], VSEGS[si][8],
                               VSEGS[si][9], VSEGS[si][11], VSEGS[si][12], VSEGS[si][13], VSEGS[si][15], VSEGS[si][16],
                               P_BASE, FORM, EMU, tl.constexpr(VASM[si * (8 // P_BASE) + i] if FORM > 0 else ""), tl.float16 if F16 else tl.float32)
                    st = (R_BASE * i + rr).to(tl.int64) * svs_t + VSEGS[si][3] * svs_s
                    if VBYTE:  # quant.group_stats: scale (e + 888) << 20 as float32 bits (255: NaN), zero -zp * scale
                        e = tl.load(vs_base + st, mask=r_ok, other=0).to(tl.int32)
                        vs = tl.where(e == 255, float("nan"), ((e + 888) << 20).to(tl.float32, bitcast=True))
                        vs = tl.where(r_ok, vs, 0.0)
                        vz = -tl.load(vz_base + st, mask=r_ok, other=0).to(tl.float32) * vs
                    else:
                        vs = tl.load(vs_base + st, mask=r_ok, other=0.0).to(tl.float32)
                        vz = tl.load(vz_base + st, mask=r_ok, other=0.0).to(tl.float32)
                    pv = (ps[i] * vs[None, :]).to(tl.float16 if F16 else tl.float32)
                    acc = tl.dot(pv, f, acc)
                    if MAGIC != 0.0:
                        zacc += ps[i] * vz[None, :] - MAGIC * pv.to(tl.float32)
                    else:
                        zacc += ps[i] * vz[None, :]
                new_accs = new_accs + (acc,)
                new_zaccs = new_zaccs + (zacc,)
            accs = new_accs
            zaccs = new_zaccs
        fin = ()  # each value segment's coefficients, [G_PAD, C_PAD] (unnormalized, this split's max)
        for si in tl.static_range(len(VSEGS)):
            fin = fin + (accs[si] * INV + tl.sum(zaccs[si], axis=1)[:, None],)
        acc_base = acc_ptr + ws * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD
        if ROT_V:  # back to the model's basis once per program: sum_seg acc_seg @ R_v[c0:c0+C], DC columns at a time
            # computed transposed, R_v^T acc^T [DC, G_PAD]: acc @ R_v made ptxas spill in the unit
            # loop on sm_90 (`benchmarks/quant_decode_compile.py`; so did R_k q^T for the query)
            for dc in tl.static_range(D_PAD // DC):
                offs_x = dc * DC + tl.arange(0, DC)
                x_ok = offs_x < d_lim
                o = tl.zeros([DC, G_PAD], tl.float32)
                for si in tl.static_range(len(VSEGS)):
                    offs_c = tl.arange(0, tl.constexpr(VSEGS[si][1]))
                    r = tl.load(rv_base + (VSEGS[si][2] + offs_c)[:, None] * srv_r
                                + offs_x[None, :] * srv_d, mask=(offs_c < VSEGS[si][0])[:, None] & x_ok[None, :],
                                other=0.0).to(tl.float32)
                    o = tl.dot(tl.trans(r), tl.trans(fin[si]), o, input_precision="tf32x3")
                tl.store(acc_ptr + ws * (G_PAD * D_PAD) + offs_g[None, :] * D_PAD + offs_x[:, None], o,
                         mask=g_ok[None, :])
        else:  # identity: coefficient c is output column c; columns DV.. get no cold contribution
            for si in tl.static_range(len(VSEGS)):
                offs_c = tl.arange(0, tl.constexpr(VSEGS[si][1]))
                tl.store(acc_base + (VSEGS[si][2] + offs_c)[None, :], fin[si],
                         mask=g_ok[:, None] & (offs_c < VSEGS[si][0])[None, :])
            if DV < D_PAD:
                offs_z = tl.arange(0, D_PAD)
                tl.store(acc_base + offs_z[None, :], tl.zeros([G_PAD, D_PAD], tl.float32),
                         mask=g_ok[:, None] & (offs_z >= DV)[None, :])
        l_i = tl.sum(l_t, axis=1)
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
        m_i, l_i, acc = exact_tail(q, ek_base, ev_base, n_e, sek_t, sek_d, sev_t, sev_d, offs_d, d_ok, offs_d, d_ok,
                                   m_i, l_i, acc, BLOCK_E)
        tl.store(acc_ptr + ws * (G_PAD * D_PAD) + offs_g[:, None] * D_PAD + offs_d[None, :], acc, mask=g_ok[:, None])
    tl.store(m_ptr + ws * G_PAD + offs_g, m_i)
    tl.store(l_ptr + ws * G_PAD + offs_g, l_i)


@triton.jit(do_not_specialize=["S_TOT"])
def qd_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    H, G, D, S_TOT,
    so_b, so_h, so_d,
    S_PAD: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, CH: tl.constexpr, SB: tl.constexpr,
):
    # One program per (row, KV head, CH output columns): merges the splits' (max, sum, acc)
    # partials, cold splits and the exact tail's alike (all in the model's basis, D wide), with
    # one joint denominator (flash-decoding), and writes the output in its dtype. The splits are
    # summed SB at a time as [SB, G_PAD, CH] tiles (at batch 1 a head has ~100 splits: one load
    # per split in a serial loop was latency-bound, ~30 µs per call).
    pid_bh = tl.program_id(0)
    c0 = tl.program_id(1) * CH
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
    rows = (h * G + offs_g).to(tl.int64)
    offs_c = c0 + tl.arange(0, CH)
    offs_sb = tl.arange(0, SB)
    out = tl.zeros([G_PAD, CH], tl.float32)
    for s0 in range(0, S_TOT, SB):
        ss = s0 + offs_sb
        sb_ok = ss < S_TOT
        w_s = tl.exp2(tl.load(m_ptr + (base + ss[:, None]) * G_PAD + offs_g[None, :], mask=sb_ok[:, None],
                              other=float("-inf")) - m_g[None, :])  # [SB, G_PAD]
        a = tl.load(acc_ptr + ((base + ss[:, None, None]) * G_PAD + offs_g[None, :, None]) * D_PAD + offs_c[None, None, :],
                    mask=sb_ok[:, None, None] & g_ok[None, :, None], other=0.0)
        out += tl.sum(a * w_s[:, :, None], axis=0)
    tl.store(out_ptr + b * so_b + rows[:, None] * so_h + offs_c[None, :] * so_d,
             (out * inv[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & (offs_c < D)[None, :])
