"""Print the validation table of the README from the eval JSON files in this folder.

    python results/validation/summarize.py

Cold-storage ratio = fp16 bytes of the tokens held in cold blocks / bytes the cold tier holds
for them (codes, scales and, for learned bases, the per-row basis), from each segment's memory
report at the end of the teacher-forced continuation (4095 tokens per row).
"""

import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def cold_ratio(rep):
    exact = rep["sinks"] + rep["warm"] + rep["hot"] + rep["padding"]
    elem = 4  # the evaluated model runs in float32: dense_bytes counts 4-byte elements
    cold_fp16 = (rep["dense_bytes"] - exact) * 2 / elem
    return cold_fp16 / (rep["cold_keys"] + rep["cold_values"])


def main():
    ppl = json.load(open(os.path.join(HERE, "validation-ppl.json")))
    niah = json.load(open(os.path.join(HERE, "validation-niah.json")))["niah"]["methods"]
    methods = dict(ppl["quality"]["methods"])
    # other caches measured on the same segments (bash benchmarks/gpu_quality.sh OUT baselines):
    # transformers' QuantizedCache with HQQ (its ratio counts its full-precision residual tokens)
    extra = os.path.join(HERE, "validation-baselines.json")
    notes = []
    if os.path.exists(extra):
        other = json.load(open(extra))["quality"]
        for name, m in other["methods"].items():
            methods.setdefault(name, m)
        if other["segment_offsets"] != ppl["quality"]["segment_offsets"]:
            notes.append(f"validation-baselines.json ran under kvpress's pins (transformers 5.2, tokenizers 0.22), whose "
                         f"tokenization puts the segments at token offsets {other['segment_offsets']} instead of "
                         f"{ppl['quality']['segment_offsets']}; its ΔPPL is against its own exact run.")
    print(f"| method | cold-storage ratio | total ratio | ΔPPL mean ± std (3 seg.) | per segment | top-1 | NIAH (15) |")
    print("|---|---|---|---|---|---|---|")
    for name, m in methods.items():
        segs = m["per_segment"]
        deltas = [s["delta"] for s in segs]
        reps = [s.get("spectral_memory_report") for s in segs]
        cold = f"{statistics.mean(cold_ratio(r) for r in reps):.2f}x" if reps[0] and reps[0]["cold_keys"] else "–"
        total = statistics.mean(s["bytes_end"]["ratio_vs_fp16"] for s in segs)
        top1 = statistics.mean(s["top1_agreement"] for s in segs)
        hits = niah.get(name, {}).get("recall")
        needles = "–" if hits is None else f"{int(sum(map(sum, hits)))}/15"
        print(f"| `{name}` | {cold} | {total:.2f}x | {statistics.mean(deltas):+.3f} ± {statistics.stdev(deltas):.3f} | "
              f"{' / '.join(f'{x:+.3f}' for x in deltas)} | {top1:.3f} | {needles} |")
    for n in notes:
        print(f"\n{n}")


if __name__ == "__main__":
    main()
