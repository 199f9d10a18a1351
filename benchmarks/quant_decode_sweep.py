"""A/B of `quant_decode` knob variants on a GPU: each variant checked against the reference
first, then timed (CUDA-graph replay, `quant_decode_bench.graph_ms`) at the e2e shapes.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python benchmarks/quant_decode_sweep.py --out DIR \
        [--presets balanced] [--points 8x32768,1x32768,16x32768] [--variants JSON]

``--variants``: a JSON list of knob dicts (`quant_decode`'s keyword arguments; {} = the
heuristic defaults). Printed per point: µs per call, GB/s of the bytes the layout must read,
and the ratio to the first variant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import quant_decode_bench as qb  # noqa: E402
from spectral_kv.kernels import quant_decode as qd  # noqa: E402

DEFAULT_VARIANTS = [
    {},
    {"block_rows": 16},
    {"block_rows": 16, "max_registers": 168},
    {"block_rows": 16, "max_registers": 128},
    {"block_rows": 32, "max_registers": 168},
    {"block_rows": 32, "num_warps": 8},
    {"num_stages": 3},
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--presets", default="balanced")
    ap.add_argument("--points", default="8x32768,1x32768,16x32768")
    ap.add_argument("--variants", default=None)
    ap.add_argument("--budget-s", type=float, default=400, help="stop starting variants after this many seconds")
    a = ap.parse_args(argv)
    t0 = time.time()
    variants = json.loads(a.variants) if a.variants else DEFAULT_VARIANTS
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    qb.log(f"# quant_decode sweep on {props.name}; variants {variants}")
    points = [tuple(int(x) for x in p.split("x")) for p in a.points.split(",")]
    ok = True
    for preset in a.presets.split(","):
        lay = qb.layouts(qb.T)[preset]
        check = qb.quant_inputs(lay, 4, qb.H, qb.G, 9, qb.T, qb.TE, [9, 1, 0, 0], [qb.TE, 1, 30, 0], seed=7)
        ref = qd.quant_decode_reference(*check["op"])
        sets = {}
        for B, ctx in points:
            NB = ctx // qb.T
            nbytes = qb.quant_bytes(lay, B, NB, qb.T, qb.TE)
            sets[(B, ctx)] = ([qb.quant_inputs(lay, B, qb.H, qb.G, NB, qb.T, qb.TE, poison=False, seed=s)
                               for s in range(qb.n_sets(nbytes, l2, cap=16))], nbytes)
        base = {}
        for kn in variants:
            kn = {"backend": "triton", **kn}  # a sweep of the tl kernel's knobs (the op's auto picks Gluon on CUDA)
            if time.time() - t0 > a.budget_s:
                qb.log(f"  [budget] {kn} not run")
                continue
            t1 = time.time()
            try:
                out = qd.quant_decode(*check["op"], **kn)
            except Exception as exc:  # a variant that does not compile (registers, shared memory)
                qb.log(f"  {preset} {kn}: FAILED to run: {exc!r}"[:400])
                continue
            err = qb.rel(out, ref) if torch.isfinite(out).all() else float("nan")
            good = err < qb.TOL
            ok &= good
            cells = []
            for (B, ctx), (ss, nbytes) in sets.items():
                ms = qb.graph_ms([lambda x=x: qd.quant_decode(*x["op"], **kn) for x in ss], rep=40)
                base.setdefault((B, ctx), ms)
                cells.append(f"{B}x{ctx // 1024}K {ms * 1e3:7.1f} us {nbytes / ms / 1e6:5.0f} GB/s "
                             f"({base[(B, ctx)] / ms:4.2f}x)")
            qb.log(f"  {preset:15s} {json.dumps(kn):52s} rel_err {err:.1e} {'OK' if good else 'FAIL'} | "
                   + " | ".join(cells) + f"  [{time.time() - t1:.0f} s]")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"quant_decode_sweep_{props.name.replace(' ', '_')}.txt"), "w") as f:
            f.write("\n".join(qb.LOG) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
