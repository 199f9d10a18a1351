"""Offline probe (no GPU): can Gluon feed the quantized kernel's codes to the tensor cores without
the shared-memory round trip the `tl` kernel pays per chunk? Compiles one 32-token x 128-channel
4-bit chunk of keys for sm_90 and prints the SASS opcode counts.

    python benchmarks/gluon_probe.py        # needs triton >= 3.6 (triton.experimental.gluon)

The codes are loaded straight into the B-operand layout of mma.sync (``DotOperandLayout(1, mma,
k_width=4)``: each thread holds 4 consecutive channels of a token, one 32-bit register), turned
into fp16 subnormals by the same PTX as `kernels/quant_unpack.py`, and multiplied with a [16, 128]
query. Measured (Triton 3.6): 8 HMMA, 16 PRMT + 13 LOP3 for the 32 code bytes a thread holds,
and no STS / LDS / LDSM / BAR: the register -> shared -> ldmatrix trip (and its ~50 barriers per
unit in the `tl` kernel) is gone for keys, whose channels are contiguous in storage. Values would
need 4 consecutive TOKENS of a channel per register (the dot's K is tokens there), i.e. a
token-interleaved storage form for value codes.
"""
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

# 4-bit codes in the low nibbles -> fp16 subnormals code * 2**-24 (kernels/quant_unpack.py's form)
UNPACK = gl.constexpr("{ .reg .b32 a; and.b32 a, $2, 0x0f0f0f0f; prmt.b32 $0, a, 0, 0x4140; prmt.b32 $1, a, 0, 0x4342; }")


@gluon.jit
def chunk_scores(x_ptr, q_ptr, o_ptr, N: gl.constexpr, C: gl.constexpr):
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
    # B = codes^T [C, N]: channel c of token t at x_ptr + t * C + c (the storage's row-major plane)
    c = gl.arange(0, C, layout=gl.SliceLayout(1, b_layout))
    t = gl.arange(0, N, layout=gl.SliceLayout(0, b_layout))
    codes = gl.load(x_ptr + t[None, :] * C + c[:, None])
    f = gl.inline_asm_elementwise(UNPACK, "=r,=r,r", [codes], dtype=gl.float16, is_pure=True, pack=4)
    g = gl.arange(0, 16, layout=gl.SliceLayout(1, a_layout))
    ca = gl.arange(0, C, layout=gl.SliceLayout(0, a_layout))
    q = gl.load(q_ptr + g[:, None] * C + ca[None, :])
    acc = mma_v2(q, f, gl.zeros([16, N], gl.float32, layout=mma))
    gm = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    tm = gl.arange(0, N, layout=gl.SliceLayout(0, mma))
    gl.store(o_ptr + gm[:, None] * N + tm[None, :], acc)


def main():
    sig = dict(x_ptr="*u8", q_ptr="*fp16", o_ptr="*fp32", N="constexpr", C="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(3)}
    out = triton.compile(GluonASTSource(fn=chunk_scores, signature=sig, constexprs=dict(N=32, C=128), attrs=attrs),
                         target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(out.asm["cubin"])
    sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", m.group(1)).split()[0].split(".")[0]
                              for m in re.finditer(r"/\*[0-9a-f]+\*/\s+(.*?);", sass))
    print(f"triton {triton.__version__}: SASS opcodes of one 32 x 128 4-bit key chunk: {dict(ops.most_common())}")
    print("shared-memory round trip:", "none" if not any(ops[k] for k in ("STS", "LDS", "LDSM", "BAR")) else
          {k: ops[k] for k in ("STS", "LDS", "LDSM", "BAR")})


if __name__ == "__main__":
    main()
