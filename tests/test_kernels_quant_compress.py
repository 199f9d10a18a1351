"""The fused compression op (`kernels.quant_compress`) against its torch twin: bit-identical
codes, scales and zeros without a rotation (every width, awkward block sizes and head dims,
mixed layouts), within the rounding of the rotation's dot product with one; the twin against
the grouped compressors' original composition (`quant.quantize_groups` + `CodeLayout.pack`)."""

import pytest
import torch

from spectral_kv.codes import CodeLayout
from spectral_kv.compressors.grouped import rotation_matrix
from spectral_kv.kernels.quant_compress import HAS_TRITON, group_layout, quant_compress, quant_compress_reference
from spectral_kv.quant import quantize_groups

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not importable")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def flat(layout):
    return [v for s in layout.segments for v in s]


def blocks(n, t, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # outlier channels, a constant channel and a constant token: the scale-1 branch runs too
    x = torch.randn(n, t, d, generator=g) * torch.linspace(0.05, 6, d)
    x[:, :, 1] = 0.75
    x[:, 2, :] = -1.5
    return x.to(dtype).to(DEV)


def composed(x, r, role, bits, group):
    """The grouped compressors' compress before the fused op (quantize_groups, then pack)."""
    n, t, d = x.shape
    c = x.float() if r is None else x.float() @ r.T
    if role == "keys":
        g = min(group, t)
        codes, scale, zero = quantize_groups(c.reshape(n, t // g, g, d), bits, dim=2)
        scale, zero = scale.squeeze(2), zero.squeeze(2)
    else:
        g = min(group, d)
        codes, scale, zero = quantize_groups(c.reshape(n, t, d // g, g), bits, dim=3)
        scale, zero = scale.squeeze(3), zero.squeeze(3)
    return group_layout(role, t, d, bits, group).pack(codes.reshape(n, t, d)), scale, zero


@pytest.mark.parametrize("role", ["keys", "values"])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_reference_is_the_grouped_compressors_math(role, rotate, bits):
    x = blocks(3, 32, 64, seed=bits)
    r = rotation_matrix(64, 0).to(DEV) if rotate else None
    lay = group_layout(role, 32, 64, bits, 16)
    got = quant_compress_reference(x, r, flat(lay), role, min(16, 32))
    for a, b, name in zip(got, composed(x, r, role, bits, 16), ("codes", "scale", "zero")):
        assert torch.equal(a, b), name


CASES = {  # role, bits, T, D, group (keys: tokens, values: channels), dtype
    "keys-k4-t64-d64": ("keys", 4, 64, 64, 32, torch.bfloat16),
    "keys-k3-t8-d128": ("keys", 3, 8, 128, 8, torch.float16),
    "keys-k5-t24-d96": ("keys", 5, 24, 96, 24, torch.float32),
    "keys-k1-t16-d64-g4": ("keys", 1, 16, 64, 4, torch.bfloat16),
    "values-v3-t64-d128": ("values", 3, 64, 128, 128, torch.bfloat16),
    "values-v2-t16-d64-g32": ("values", 2, 16, 64, 32, torch.float16),
    "values-v7-t8-d96-g32": ("values", 7, 8, 96, 32, torch.float32),
    "values-v6-t32-d96": ("values", 6, 32, 96, 128, torch.bfloat16),
    "values-v8-t16-d64": ("values", 8, 16, 64, 64, torch.bfloat16),
}


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_is_bit_identical_without_rotation(case):
    role, bits, t, d, group, dtype = CASES[case]
    x = blocks(3, t, d, dtype, seed=len(case))
    lay = group_layout(role, t, d, bits, group)
    kg = min(group, t)
    got, want = quant_compress(x, None, flat(lay), role, kg), quant_compress_reference(x, None, flat(lay), role, kg)
    for a, b, name in zip(got, want, ("codes", "scale", "zero")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name


@needs_triton
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_and_the_block_rows_knob(bits):
    t = 32  # 1-bit planes: 4 rows of the smallest plane; block_rows 1 and 2 split them
    for role in ("keys", "values"):
        x = blocks(2, t, 64, seed=bits)
        lay = group_layout(role, t, 64, bits, 16)
        want = quant_compress_reference(x, None, flat(lay), role, 16)
        for br in (0, 1, 2, 8):
            got = quant_compress(x, None, flat(lay), role, 16, block_rows=br)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (role, br)


@needs_triton
@pytest.mark.parametrize("role", ["keys", "values"])
def test_mixed_layout_with_a_dropped_tail(role):
    # learned-basis shape: segments of different widths, the last one dropped
    lay = CodeLayout(16, ((16, 6), (16, 4), (16, 2), (16, 0)))
    x = blocks(2, 16, 64, seed=4)
    got, want = quant_compress(x, None, flat(lay), role, 8), quant_compress_reference(x, None, flat(lay), role, 8)
    assert got[0].shape == (2, lay.nbytes)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_triton
@pytest.mark.parametrize("role", ["keys", "values"])
@pytest.mark.parametrize("d", [64, 96])  # Hadamard, and a seeded random orthogonal rotation
def test_rotation_differs_only_by_the_dot_rounding(role, d):
    t, bits, group = 32, 3, 16
    x = blocks(4, t, d, seed=d)
    r = rotation_matrix(d, 0).to(DEV)
    lay = group_layout(role, t, d, bits, group)
    (kc, ks, kz), (rc, rs, rz) = quant_compress(x, r, flat(lay), role, 16), quant_compress_reference(x, r, flat(lay), role, 16)
    # fp16 statistics: at most one fp16 ulp apart (an fp32 min/max an ulp away from a boundary)
    for a, b in ((ks, rs), (kz, rz)):
        assert (a.float() - b.float()).abs().le(b.float().abs() * 2**-10 + 2**-24).all()
    codes_k, codes_r = lay.unpack(kc).int(), lay.unpack(rc).int()
    diff = (codes_k - codes_r).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3
    # and the codes reconstruct the rotated block within half a step (plus fp16 rounding)
    c = x.float() @ r.T
    if role == "keys":
        s, z = ks.float().repeat_interleave(16, 1), kz.float().repeat_interleave(16, 1)
    else:
        s, z = ks.float().repeat_interleave(d // ks.shape[-1], 2), kz.float().repeat_interleave(d // ks.shape[-1], 2)
    err = (codes_k.float() * s + z - c).abs()
    assert (err <= s * 0.5 + 1e-3 * c.abs().amax()).all()


@needs_triton
def test_empty_pool_and_bad_input():
    lay = group_layout("keys", 16, 64, 4, 16)
    codes, scale, zero = quant_compress(torch.zeros(0, 16, 64, device=DEV), None, flat(lay), "keys", 16)
    assert codes.shape == (0, lay.nbytes) and scale.shape == zero.shape == (0, 1, 64)
    x = blocks(1, 16, 64)
    with pytest.raises(ValueError, match="role"):
        quant_compress(x, None, flat(lay), "queries", 16)
    with pytest.raises(ValueError, match="key_group=6"):
        quant_compress(x, None, flat(lay), "keys", 6)
    with pytest.raises(ValueError, match="head_dim 64"):
        quant_compress(x, None, flat(group_layout("keys", 16, 32, 4, 16)), "keys", 16)
    with pytest.raises(ValueError, match="rotation"):
        quant_compress(x, torch.eye(32, device=DEV), flat(lay), "keys", 16)
    with pytest.raises(ValueError, match="block_size=12"):
        quant_compress(blocks(1, 12, 64), None, flat(group_layout("values", 12, 64, 3, 64)), "values", 12)


@needs_triton
def test_opcheck():
    lay = group_layout("values", 16, 64, 3, 32)
    args = (blocks(2, 16, 64), rotation_matrix(64, 0).to(DEV), flat(lay), "values", 16)
    # test_aot_dispatch_dynamic cannot pass under TRITON_INTERPRET=1 (see test_kernels_quant).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    res = torch.library.opcheck(torch.ops.spectral_kv.quant_compress.default, args, test_utils=utils)
    assert all(v == "SUCCESS" for v in res.values()), res


# ---------------------------------------------------------------------------- byte value statistics
def hostile(n, t, d, dtype, seed):
    """`blocks` plus the byte form's edge cases: a zero token, a token whose range lies far from
    0 (the zero point would leave int8: the scale widens), one with a NaN, one with an inf."""
    x = blocks(n, t, d, dtype, seed).float()
    x[0, 3] = 0.0
    x[-1, 4] = 100.0 + 0.05 * x[-1, 4]
    x[-1, 5, 7] = float("nan")
    x[0, 6, 2] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_reference_byte_value_stats_is_quantize_groups_per_segment(rotate, bits):
    x = hostile(3, 32, 64, torch.bfloat16, seed=bits)
    r = rotation_matrix(64, 0).to(DEV) if rotate else None
    lay = group_layout("values", 32, 64, bits, 16)
    codes, scale, zero = quant_compress_reference(x, r, flat(lay), "values", 1, "byte")
    c = (x.float() if r is None else x.float() @ r.T).reshape(3, 32, 4, 16)
    q, s, z = quantize_groups(c, bits, dim=3, stats="byte")
    assert scale.dtype == torch.uint8 and zero.dtype == torch.int8 and scale.shape == (3, 32, 4)
    assert torch.equal(codes, lay.pack(q.reshape(3, 32, 64)))
    assert torch.equal(scale, s.squeeze(3)) and torch.equal(zero, z.squeeze(3))


BYTE_CASES = {k: v for k, v in CASES.items() if v[0] == "values"}


@needs_triton
@pytest.mark.parametrize("case", sorted(BYTE_CASES))
def test_kernel_byte_value_stats_are_bit_identical_without_rotation(case):
    _, bits, t, d, group, dtype = BYTE_CASES[case]
    x = hostile(3, t, d, dtype, seed=len(case))
    lay = group_layout("values", t, d, bits, group)
    got = quant_compress(x, None, flat(lay), "values", 1, "byte")
    want = quant_compress_reference(x, None, flat(lay), "values", 1, "byte")
    for a, b, name in zip(got, want, ("codes", "scale", "zero")):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert (want[1] == 255).sum() >= 2  # the NaN and the inf tokens took the NaN scale code


@needs_triton
def test_kernel_byte_value_stats_with_rotation_differ_only_by_the_dot_rounding():
    from spectral_kv.quant import group_stats

    t, d, bits = 32, 64, 3
    x = blocks(4, t, d, seed=7)
    r = rotation_matrix(d, 0).to(DEV)
    lay = group_layout("values", t, d, bits, 32)
    (kc, ks, kz), (rc, rs, rz) = (f(x, r, flat(lay), "values", 1, "byte") for f in (quant_compress, quant_compress_reference))
    # a coefficient a few ulps off moves the needed scale across a code boundary only rarely
    for a, b in ((ks, rs), (kz, rz)):
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 2e-2
    codes = lay.unpack(kc).float()
    s, z = (v.repeat_interleave(32, 2) for v in group_stats(ks, kz))
    c = x.float() @ r.T
    assert ((codes * s + z - c).abs() <= s * 0.5 + 1e-3 * c.abs().amax()).all()


@needs_triton
def test_byte_value_stats_refused_for_keys_and_bad_names():
    lay = group_layout("keys", 16, 64, 4, 16)
    x = blocks(1, 16, 64)
    for fn in (quant_compress, quant_compress_reference):
        with pytest.raises(ValueError, match="value_stats='byte' applies to values"):
            fn(x, None, flat(lay), "keys", 16, "byte")
        with pytest.raises(ValueError, match="'e4m3'"):
            fn(x, None, flat(group_layout("values", 16, 64, 4, 16)), "values", 16, "e4m3")
    empty = quant_compress(torch.zeros(0, 16, 64, device=DEV), None, flat(group_layout("values", 16, 64, 4, 16)),
                           "values", 1, "byte")
    assert empty[1].dtype == torch.uint8 and empty[2].dtype == torch.int8 and empty[1].shape == (0, 16, 4)


@needs_triton
def test_opcheck_byte_value_stats():
    lay = group_layout("values", 16, 64, 3, 32)
    args = (blocks(2, 16, 64), rotation_matrix(64, 0).to(DEV), flat(lay), "values", 16, "byte")
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    res = torch.library.opcheck(torch.ops.spectral_kv.quant_compress.default, args, test_utils=utils)
    assert all(v == "SUCCESS" for v in res.values()), res
