"""Compile the quant_decode kernels for sm_90 without a GPU (Triton frontend -> PTX -> ptxas -v):
registers and spills per layout and knob. `python benchmarks/quant_decode_compile.py`."""
import inspect, os, subprocess, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spectral_kv.codes import CodeLayout, planes, plane_rows
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

def check(kseg, vseg, T=512, kg=128, G=4, D=128, dt="bf16", br=16, nw=4, ns=2):
    kl, vl = CodeLayout(T, kseg), CodeLayout(T, vseg)
    p_base = min(planes(b)[-1] for _, b in kl.kept_segments + vl.kept_segments)
    r_base = plane_rows(T, p_base)
    const = dict(KG=kg, R_BASE=r_base, P_BASE=p_base, BR=br, KSEGS=QD._segments(kl, p_base), VSEGS=QD._segments(vl, p_base),
                 KEY_BCAST=kg % br == 0 and r_base % br == 0, G_PAD=16, D_PAD=QD._pow2(D, 16), DV_PAD=QD._pow2(vl.kept, 16), BLOCK_E=64)
    ptrs = dict(qk_ptr="*fp32", q_ptr=f"*{dt}", kc_ptr="*u8", ks_ptr="*fp16", kz_ptr="*fp16", vc_ptr="*u8", vs_ptr="*fp16",
                vz_ptr="*fp16", ncold_ptr="*i32", ek_ptr=f"*{dt}", ev_ptr=f"*{dt}", nexact_ptr="*i32",
                m_ptr="*fp32", l_ptr="*fp32", accc_ptr="*fp32", acce_ptr="*fp32")
    t = time.time()
    src = ASTSource(fn=qd_partial_kernel, signature=sig(qd_partial_kernel, ptrs, const), constexprs=const)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))
    md = out.metadata
    print(kseg, vseg, br, nw, f"compiled in {time.time()-t:.1f}s shared={md.shared}")
    ptx = out.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    print("   ", " ".join(l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "Used" in l or "spill" in l))
    const2 = dict(S_PAD=64, G_PAD=16, D_PAD=QD._pow2(D, 16), DV_PAD=QD._pow2(vl.kept, 16))
    ptrs2 = dict(m_ptr="*fp32", l_ptr="*fp32", accc_ptr="*fp32", acce_ptr="*fp32", outc_ptr="*fp32", oute_ptr="*fp32")
    triton.compile(ASTSource(fn=qd_combine_kernel, signature=sig(qd_combine_kernel, ptrs2, const2), constexprs=const2),
                   target=GPUTarget("cuda", 90, 32))

if __name__ == "__main__":
    check(((128, 4),), ((128, 3),))                   # balanced
    check(((128, 3),), ((128, 2),))                   # max-compression
    check(((128, 4),), ((32, 4),) * 4, kg=32)         # kivi4 at head_dim 128
    check(((16, 6), (16, 4), (32, 2)), ((16, 6), (16, 4), (32, 2)), D=64, T=64, kg=64)  # learned-basis shape
    for nw in (4, 8):
        for br in (16, 32, 64):
            check(((128, 4),), ((128, 3),), nw=nw, br=br)
