"""Print the validation table of the README from the eval JSON files in this folder.

    python results/validation/summarize.py [--plot]   # --plot: validation-frontier-all.png

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
    # transformers' QuantizedCache with HQQ (its ratio counts its full-precision residual tokens),
    # and kvpress's presses (token eviction; ratio = fraction of the context pressed away)
    notes = []
    for fname in ("validation-baselines.json", "validation-kvpress.json"):
        extra = os.path.join(HERE, fname)
        if not os.path.exists(extra):
            continue
        other = json.load(open(extra))["quality"]
        for name, m in other["methods"].items():
            methods.setdefault(name, m)
        if other["segment_offsets"] != ppl["quality"]["segment_offsets"]:
            notes.append(f"{fname} ran under kvpress's pins (transformers 5.2, tokenizers 0.22), whose "
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
    if "--plot" in __import__("sys").argv:
        plot(methods, os.path.join(HERE, "validation-frontier-all.png"))


def plot(methods, path):
    """Total bytes ratio (end of the continuation) against ΔPPL, every method of both runs; a
    symmetric-log y axis so HQQ-2 (+90) shares the plot with the near-lossless points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, m in methods.items():
        segs = m["per_segment"]
        x = statistics.mean(s["bytes_end"]["ratio_vs_fp16"] for s in segs)
        d = [s["delta"] for s in segs]
        ax.errorbar([x], [statistics.mean(d)], yerr=[statistics.stdev(d)], fmt="o", capsize=3)
        ax.annotate(name.replace("spectral:preset=", ""), (x, statistics.mean(d)), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_yscale("symlog", linthresh=0.1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axhline(0.05, color="green", lw=0.5, ls="--")
    ax.axhline(0.20, color="orange", lw=0.5, ls="--")
    ax.set_xlabel("compression vs fp16 KV (all bytes held at the end, measured)")
    ax.set_ylabel("ΔPPL vs exact (mean ± std, 3 segments; symlog)")
    ax.set_title("SmolLM2-135M, validation split, 3584 ctx + 512 teacher-forced (goal lines +0.05, +0.20)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
