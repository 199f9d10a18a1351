"""Markdown table of an `e2e_decode.py` results JSON (the README's end-to-end table).

    python benchmarks/e2e_table.py benchmarks/results/e2e_decode_NVIDIA_H200.json
"""

import json
import sys


def main(path):
    d = json.load(open(path))
    rows = d["rows"]
    points = {}
    for r in rows:
        points.setdefault((r["shape"], r["batch"], r["ctx"]), []).append(r)
    print("| shape | batch x context | method | ms / step | vs best stock | floor (ms) | of floor | bytes limit |")
    print("|---|---|---|---|---|---|---|---|")
    for (shape, b, ctx), rs in points.items():
        stock = [r["ms"] for r in rs if r["method"] in ("dynamic", "static+compile")]
        best = min(stock) if stock else float("nan")
        for r in rs:
            name = {"dynamic": "`DynamicCache` generate", "static+compile": "static cache + compile"}.get(
                r["method"], "`" + r["method"].replace(" static", "` StaticDecoder").replace(" generate", "` generate"))
            print(f"| {shape} | {b} x {ctx // 1024}K | {name} | {r['ms']:.2f} | {best / r['ms']:.2f}x | "
                  f"{r['floor_ms']:.2f} | {r['floor_ms'] / r['ms']:.0%} | {r['bytes_limit']:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
