"""Compile the quant_compress kernels for sm_90 without a GPU (Triton frontend -> PTX -> ptxas -v):
registers and spills per layout and num_warps. `PYTHONPATH=. python benchmarks/quant_compress_compile.py`.
(The rotation's dot in plain fp32 FMA ("ieee") spilled ~9 KB at 8 warps; tf32x3 compiles clean.)"""
import inspect, os, subprocess, tempfile, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spectral_kv.codes import planes, plane_rows
from spectral_kv.kernels import quant_compress as QC
from spectral_kv.kernels.quant_compress_triton import qc_key_stats_kernel, qc_pack_kernel

def sig(fn, ptrs, const):
    s = {}
    for n in inspect.signature(fn.fn).parameters:
        s[n] = "constexpr" if n in const else ptrs.get(n, "i64" if n.startswith("s") else "i32")
    return s

def ptxas(out, label):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(out.asm["ptx"])
    p = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas")
    r = subprocess.run([p, "-arch=sm_90a", "-v", f.name, "-o", "/dev/null"], capture_output=True, text=True)
    print(label, " ".join(l.split(":", 1)[-1].strip() for l in r.stderr.splitlines() if "Used" in l or "spill" in l), r.returncode)

def check(role, bits, T=512, D=128, group=128, has_r=True, nw=8, xdt="bf16"):
    lay = QC.group_layout(role, T, D, bits, group)
    p_min = min(planes(b)[-1] for _, b in lay.kept_segments); r_min, nsub = plane_rows(T, p_min), 8 // p_min
    br = max(min(QC._pow2(r_min, 1), max(64 // nsub, 1)), 16 // nsub)
    kg = min(group, T) if role == "keys" else 1
    ptrs = dict(x_ptr=f"*{xdt}", r_ptr="*fp32", sc_ptr="*fp16", zr_ptr="*fp16", codes_ptr="*u8")
    const = dict(KG=kg, R_MIN=r_min, P_MIN=p_min, BR=br, NSUB=nsub, SEGS=QC._segments(lay), HAS_R=has_r, KEYS=role == "keys", D_PAD=QC._pow2(D, 16))
    t = time.time()
    out = triton.compile(ASTSource(fn=qc_pack_kernel, signature=sig(qc_pack_kernel, ptrs, const), constexprs=const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
    ptxas(out, f"pack {role} {bits}b D{D} R={has_r} {time.time()-t:.1f}s")
    if role == "keys":
        const = dict(KG=kg, BT=min(64, QC._pow2(kg, 16)), SEGS=QC._segments(lay), HAS_R=has_r, D_PAD=QC._pow2(D, 16))
        out = triton.compile(ASTSource(fn=qc_key_stats_kernel, signature=sig(qc_key_stats_kernel, ptrs, const), constexprs=const), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw))
        ptxas(out, f"stats {role} {bits}b")

if __name__ == "__main__":
    for nw in (4, 8):  # 8 is the op's default
        for role, bits, kw in (("keys", 4, {}), ("values", 3, {}), ("keys", 3, {}), ("values", 2, {}),
                               ("values", 4, dict(group=32, has_r=False)), ("keys", 7, dict(D=96, group=64))):
            check(role, bits, nw=nw, **kw)
