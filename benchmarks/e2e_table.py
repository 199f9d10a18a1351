"""The README's end-to-end table from the e2e benchmark's text outputs (their "summary" block).

    python benchmarks/e2e_table.py benchmarks/results/e2e_decode_H200_mistral7b.txt benchmarks/results/e2e_decode_H200_smollm2.txt
"""
import re
import sys

NAMES = {"dynamic": "`DynamicCache` generate", "static+compile": "static cache + compile"}


def rows(path):
    text = open(path).read()
    block = text[text.index("## summary"):].splitlines()[2:]
    for line in block:
        m = re.match(r"(\S+)\s+(\d+)x(\d+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+([\d.]+|nan)x\s+([\d.]+)x\s*$", line)
        if not m:
            break
        shape, b, ctx, method, ms, floor, of, vs, limit = m.groups()
        if method not in NAMES:
            preset, kind = method.split(" ", 1)
            method = f"`{preset}` " + {"static": "StaticDecoder", "static compiled": "StaticDecoder(compile=True)",
                                       "generate": "generate"}[kind]
        vs = "– (no stock path at this batch)" if vs == "nan" else f"{vs}x"  # the largest batches: own batch each
        yield f"| {shape} | {b} x {int(ctx) // 1024}K | {NAMES.get(method, method)} | {ms} | {vs} | {floor} | {of}% | {limit}x |"


def main(paths):
    print("| shape | batch x context | method | ms / step | vs best stock | floor (ms) | of floor | bytes limit |")
    print("|---|---|---|---|---|---|---|---|")
    for p in paths:
        for r in rows(p):
            print(r)


if __name__ == "__main__":
    main(sys.argv[1:])
