"""Tuning-split experiment (issue 14): value storage forms at equal bytes, judged by the attention
output error of the captured exact queries with EXACT keys (isolates the value error).
Forms: (H) Hadamard basis, per-token scale/zero over all 64 channels (today's balanced values);
(P-tok) per-row PCA basis, per-token scale/zero (today's spectral_quant values, one segment);
(P-chan) per-row PCA basis, per-component scale/zero over 128-token groups (as keys are stored),
bits per component allocated greedily from measured per-component errors to a budget (any jump
in width allowed: 1-bit min/max can be worse than dropping a component). "H chan": Hadamard with
per-channel 128-token groups. Bits per coefficient count codes and fp16 scale+zero; the per-row
PCA basis (P forms) costs the same for both P forms and is not counted.

    python -m spectral_kv.eval.tune capture CAPTURE.pt       # tuning split only (~2 min on 2 cores)
    python results/experiments/value_scales.py CAPTURE.pt    # ~5 min; output: value_scales.txt
"""
import math, sys, torch
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__import__('os').path.abspath(__file__)), '..', '..'))
from spectral_kv.eval.fidelity import layer_fidelity

torch.manual_seed(0)
d = torch.load(sys.argv[1] if len(sys.argv) > 1 else '/tmp/quality_tune_capture.pt', weights_only=False)
T, SINK, HOT, G = 512, 4, 64, 128

def hadamard(n):
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)

def q_tok(x, bits):  # x [N, T, C]: per-token min/max over C
    if bits == 0: return torch.zeros_like(x)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).half().float(); s = torch.where(s > 0, s, torch.ones_like(s)); lo = lo.half().float()
    return (((x - lo) / s).round().clamp(0, 2**bits - 1)) * s + lo

def q_chan(x, bits):  # x [N, T, 1]: per component, min/max over G-token groups
    if bits == 0: return torch.zeros_like(x)
    n, t, c = x.shape
    xg = x.reshape(n, t // G, G, c)
    lo, hi = xg.amin(2, keepdim=True), xg.amax(2, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).half().float(); s = torch.where(s > 0, s, torch.ones_like(s)); lo = lo.half().float()
    return ((((xg - lo) / s).round().clamp(0, 2**bits - 1)) * s + lo).reshape(n, t, c)

def allocate(y, budget_bits):  # y [N, T, D] coefficients; greedy on measured squared error
    D = y.shape[-1]
    err = torch.stack([torch.stack([((q_chan(y[..., c:c+1], b) - y[..., c:c+1])**2).sum() for b in range(9)]) for c in range(D)])
    bits = [0] * D
    # cost of a component: b bits per token + (if b>0) 32 bits of stats per G tokens
    spent, total = 0.0, budget_bits * D
    while True:
        best, bc, bb = 0, None, None
        for c in range(D):
            for nb in range(bits[c] + 1, 9):  # any jump: 1-bit min/max can be worse than nothing
                cost = (nb - bits[c]) + (32 / G if bits[c] == 0 else 0)
                gain = (err[c, bits[c]] - err[c, nb]).item() / cost
                if spent + cost <= total + 1e-9 and gain > best: best, bc, bb = gain, c, nb
        if bc is None: break
        spent += (bb - bits[bc]) + (32 / G if bits[bc] == 0 else 0); bits[bc] = bb
    ALLOC.append(bits)
    return bits, spent / D

ALLOC = []
res = {}
for seg in d["segments"]:
    for li, ((k, v), q) in enumerate(zip(seg["kv"], seg["q"])):
        k, v, q = k.float(), v.float(), q.float()
        n = k.shape[1]; nb = (n - SINK - HOT) // T; a, b = SINK, SINK + nb * T
        cold = v[:, a:b]  # [H, nb*T, D]
        Dm = v.shape[-1]
        # per-row (per KV head) PCA of the cold values (uncentered, as spectral_quant's fit)
        basis = torch.linalg.eigh(cold.transpose(1, 2) @ cold)[1].flip(-1).transpose(1, 2)  # [H, D, D] rows = components
        y = cold @ basis.transpose(1, 2)
        Hm = hadamard(Dm)
        yh = cold @ Hm.T
        forms = {}
        for bits in (2, 3):
            forms[f"H tok {bits}b"] = (q_tok(yh, bits) @ Hm, bits + 32 / Dm)
            forms[f"P tok {bits}b"] = (q_tok(y, bits) @ basis, bits + 32 / Dm)
        for budget in (2.25, 2.5, 3.25, 3.5):
            bl, spent = allocate(y.reshape(1, -1, Dm)[:, : (y.shape[0] * y.shape[1]) // G * G], budget)
            yq = torch.cat([q_chan(y[..., c:c+1], bl[c]) for c in range(Dm)], -1)
            forms[f"P chan {budget}"] = (yq @ basis, spent)
            yqh = torch.cat([q_chan(yh[..., c:c+1], int(budget - 0.25)) for c in range(Dm)], -1)
            forms[f"H chan {int(budget-0.25)}b"] = (yqh @ Hm, int(budget - 0.25) + 32 / G)
        for name, (vc, bpc) in forms.items():
            vv = v.clone(); vv[:, a:b] = vc
            f = layer_fidelity(q, k, v, k, vv)
            r = res.setdefault(name, [[], []]); r[0].append(f["output_rel_err"]); r[1].append(bpc)
for name, (e, bpc) in sorted(res.items(), key=lambda kv: sum(kv[1][1]) / len(kv[1][1])):
    print(f"{name:14s} bits/coef {sum(bpc)/len(bpc):5.2f} (+ basis for P)  out_err mean {sum(e)/len(e):.4f} max {max(e):.4f}")
import collections
print("example allocations (first 3):", ALLOC[:3])
