"""The exact tail's attention (sinks, warm, hot: plain K/V) as one `@triton.jit` helper, inlined by
every decode kernel that attends over it: the quantized `tl` partial kernel, the Gluon path's
finish kernel and the SVD kernel. Importing this module needs triton."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["exact_tail"]


@triton.jit
def exact_tail(q, ek_base, ev_base, n_e, sek_t, sek_d, sev_t, sev_d, offs_d, d_ok, offs_v, v_ok, m_i, l_i, acc,
               BLOCK_E: tl.constexpr):
    """Online softmax (exp2) of ``q`` [G_PAD, D_PAD] fp32 (scale and log2(e) folded in) over the first
    ``n_e`` exact tokens, BLOCK_E at a time: keys ``ek_base + t * sek_t + d * sek_d`` over ``offs_d``
    (valid ``d_ok``), values at columns ``offs_v`` (valid ``v_ok``). Carries the running max ``m_i``,
    sum ``l_i`` [G_PAD] and accumulator ``acc`` [G_PAD, len(offs_v)] in and returns them."""
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
        v = tl.load(ev_base + offs_t[:, None].to(tl.int64) * sev_t + offs_v[None, :] * sev_d,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    return m_i, l_i, acc
