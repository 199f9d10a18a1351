"""Compile the quant_decode kernels for sm_90 without a GPU (Triton frontend -> PTX -> ptxas -v):
registers and spills per layout and knob. `python benchmarks/quant_decode_compile.py`."""
import inspect, os, subprocess, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spectral_kv.codes import CodeLayout
from spectral_kv.kernels import quant_decode as QD
from spectral_kv.kernels.quant_decode_triton import qd_partial_kernel, qd_combine_kernel

def sig(fn, ptrs, const):
    names = list(inspect.signature(fn.fn).parameters)
    s = {}
    for n in names:
        if n in const: s[n] = "constexpr"
        elif n in ptrs: s[n] = ptrs[n]
        elif n == "qk_scale": s[n] = "fp32"
        else: s[n] = "i64" if n.startswith("s") and n not in ("S_COLD", "S_TOT") else "i32"
    return s

def check(kseg, vseg, T=512, kg=128, G=4, D=128, dt="bf16", br=0, nw=4, ns=0, operands="fp16", maxnreg=None, unpack="auto",
          rot=True):
    kl, vl = CodeLayout(T, kseg), CodeLayout(T, vseg)
    # the constexprs and launch options the op itself would use (68 exact tokens, as the bench);
    # rot: fp32 bases for both roles (hadamard, learned), False: identity (kivi)
    rk_on, rv_on = rot if isinstance(rot, tuple) else (rot, rot)  # (keys, values)
    const, opts = QD._kernel_constants(kl, vl, G, D, 68, kg, br, nw, ns, operands, unpack, False, rk_on, rv_on)
    br, ns = const["BR"], opts["num_stages"]
    ptrs = dict(q_ptr=f"*{dt}", rk_ptr="*fp32", rv_ptr="*fp32", kc_ptr="*u8", ks_ptr="*fp16", kz_ptr="*fp16", vc_ptr="*u8",
                vs_ptr="*fp16", vz_ptr="*fp16", ncold_ptr="*i32", ek_ptr=f"*{dt}", ev_ptr=f"*{dt}", nexact_ptr="*i32",
                m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32")
    t = time.time()
    # what a launch specializes: unit strides become constants, pointers and the other strides
    # of real pools are multiples of 16 (Triton's divisibility hint)
    ones = ["sq_d", "srk_d", "srv_d", "sks_d", "sek_d", "sev_d", "svs_s"] + (["svs_t"] if len(vl.kept_segments) == 1 else [])
    const.update({n: 1 for n in ones})
    names = list(inspect.signature(qd_partial_kernel.fn).parameters)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in ptrs or (n.startswith("s") and n[1:3] in ("q_", "rk", "rv", "kc", "ks", "vc", "vs", "ek", "ev") and n not in ones)}
    src = ASTSource(fn=qd_partial_kernel, signature=sig(qd_partial_kernel, ptrs, const), constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(**opts, maxnreg=maxnreg))
    md = out.metadata
    print(kseg, vseg, f"br={br} nw={nw} ns={ns} {operands} unpack={unpack} maxnreg={maxnreg} rot={rot}", f"compiled in {time.time()-t:.1f}s shared={md.shared}")
    ptx = out.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    print("   ", " ".join(l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "Used" in l or "spill" in l))
    pads = {n: const[n] for n in ("G_PAD", "D_PAD")}
    const2 = dict(S_PAD=64, **pads, CH=min(32, pads["D_PAD"]), SB=16)
    ptrs2 = dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", out_ptr=f"*{dt}")
    triton.compile(ASTSource(fn=qd_combine_kernel, signature=sig(qd_combine_kernel, ptrs2, const2), constexprs=const2),
                   target=GPUTarget("cuda", 90, 32))

if __name__ == "__main__":
    check(((128, 4),), ((128, 3),))                   # balanced
    check(((128, 3),), ((128, 2),))                   # max-compression
    check(((128, 4),), ((32, 4),) * 4, kg=32, rot=False)  # kivi4 at head_dim 128 (identity basis)
    check(((16, 6), (16, 4), (32, 2)), ((16, 6), (16, 4), (32, 2)), D=64, T=64, kg=64)  # learned-basis shape
    check(((32, 6), (32, 4), (64, 2)), ((32, 5), (32, 3), (64, 2)))  # the bench's mixed layout
    check(((128, 4),), ((128, 3),), operands="fp32")  # the tf32 operands
    for nw in (4, 8):
        for br in (16, 32, 64):
            check(((128, 4),), ((128, 3),), nw=nw, br=br)
