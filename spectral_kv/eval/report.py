"""Results on disk: one JSON per run, the frontier plot, the NIAH heatmap and the README table."""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

__all__ = ["write_json", "plot_frontier", "plot_niah", "plot_niah_per_method", "render_table", "render_runs", "write_table"]


def write_json(result: dict[str, Any], path: str) -> None:
    """Write ``result`` (NaN/inf become null)."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean(result), f, indent=1)


def plot_frontier(result: dict[str, Any], path: str) -> bool:
    """Bytes ratio vs fp16 (after the prefill) against ΔPPL, one point per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    q = result.get("quality")
    if not q:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for spec, r in q["methods"].items():
        s = r["summary"]
        x, y, e = s["ratio_vs_fp16_after_prefill"]["mean"], s["delta"]["mean"], s["delta"]["std"]
        ax.errorbar([x], [y], yerr=[e], fmt="o", capsize=3)
        ax.annotate(spec, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    c = result["config"]
    ax.set_xlabel("compression vs fp16 KV (bytes held after prefill, measured)")
    ax.set_ylabel("ΔPPL vs exact cache (mean ± std over segments)")
    ax.set_title(f"{c['model']}: {c['context']} ctx + {c['continuation']} teacher-forced, {c['segments']} seg.", fontsize=9)
    ax.axhline(0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in spec).strip("-")


def plot_niah_per_method(result: dict[str, Any], stem: str) -> list[str]:
    """``{stem}_niah_{method}.png``: one heatmap file per method; returns the paths written."""
    n = result.get("niah")
    made = []
    for spec in (n or {}).get("methods", {}):
        one = dict(result, niah=dict(n, methods={spec: n["methods"][spec]}))
        path = f"{stem}_niah_{_slug(spec)}.png"
        if plot_niah(one, path):
            made.append(path)
    return made


def plot_niah(result: dict[str, Any], path: str) -> bool:
    """Recall heatmaps (lengths x depths), one panel per method; False without matplotlib or NIAH results."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n = result.get("niah")
    if not n or not n["methods"]:
        return False
    specs = list(n["methods"])
    fig, axes = plt.subplots(1, len(specs), figsize=(2.6 * len(specs) + 1, 2.6), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        rec = n["methods"][spec]["recall"]
        im = ax.imshow(rec, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(n["depths"])), [f"{int(d * 100)}%" for d in n["depths"]], fontsize=7)
        ax.set_yticks(range(len(n["lengths"])), [str(x) for x in n["lengths"]], fontsize=7)
        for i, row in enumerate(rec):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax.set_title(spec, fontsize=7)
        ax.set_xlabel("needle depth", fontsize=7)
    axes[0][0].set_ylabel("haystack tokens", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="recall")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def _fmt(s: dict | None, key: str, digits: int = 3, pm: bool = False) -> str:
    if not s or key not in s or s[key] is None:
        return "–"
    v = s[key]
    if pm:
        return f"{v['mean']:+.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v['mean']:.{digits}f}"


def render_table(results: list[dict[str, Any]]) -> str:
    """Markdown quality table from result dicts, one row per (run, method), with its command."""
    lines = [
        "| run | method | bytes/token/layer (fp16-eq.) | ratio vs fp16 | ΔPPL (± std) | rel. | top-1 agr. | "
        "score corr. | attn-out rel. err | attn KL | top-16 recall | NIAH recall | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        q = (res.get("quality") or {}).get("methods", {})
        n = (res.get("niah") or {}).get("methods", {})
        for spec in res["methods_run"]:
            s = q.get(spec, {}).get("summary")
            rec = n.get(spec, {}).get("recall")
            niah = f"{sum(map(sum, rec)) / sum(map(len, rec)):.2f}" if rec else "–"
            rel = f"{100 * s['rel']['mean']:+.1f}%" if s else "–"
            lines.append(
                f"| {res['tag']} | `{spec}` | {_fmt(s, 'bytes_per_token_layer_end', 1)} | "
                f"{_fmt(s, 'ratio_vs_fp16_after_prefill', 2)}x | {_fmt(s, 'delta', 3, pm=True)} | {rel} | "
                f"{_fmt(s, 'top1_agreement')} | {_fmt(s, 'fidelity_mean_score_corr')} | "
                f"{_fmt(s, 'fidelity_mean_output_rel_err')} | {_fmt(s, 'fidelity_mean_kl', 4)} | "
                f"{_fmt(s, 'fidelity_mean_topk_recall')} | {niah} | `{res['command']}` |"
            )
    return "\n".join(lines) + "\n"


def render_runs(results: list[dict[str, Any]]) -> str:
    """Notes under the table: each run's measured wall time, machine, corpus, skipped methods, notes."""
    lines = ["Runs (wall time measured by the run itself, model load included):", ""]
    for res in results:
        c, m = res.get("config", {}), res.get("machine", {})
        secs = res.get("seconds") or {}
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        load = m.get("load_average_at_end")
        what = []
        if res.get("quality"):
            what.append(f"{c.get('segments')} segment(s) of {c.get('context')} + {c.get('continuation')} tokens, chunk {c.get('chunk')}")
        if res.get("niah"):
            n = res["niah"]
            what.append(f"NIAH {'/'.join(map(str, n['lengths']))} tokens x depths "
                        f"{'/'.join(f'{int(d * 100)}%' for d in n['depths'])}")
        line = (f"- `{res['tag']}`: {res.get('seconds_total', float('nan')):.0f} s on {m.get('cpus')} CPUs"
                + (f" (load average at the end {load[0]:.1f})" if load else "")
                + (f" [{parts}]" if parts else "") + "; " + "; ".join(what)
                + f"; corpus: {res.get('corpus', {}).get('name')}.")
        for spec, why in (res.get("methods_skipped") or {}).items():
            line += f" Not run: `{spec}` ({why})."
        for note in res.get("notes", []):
            line += " " + note
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_table(results_dir: str, path: str | None = None) -> str:
    """Regenerate ``results/README_table.md`` from every ``*.json`` in ``results_dir``."""
    results = []
    for f in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(f) as fh:
            r = json.load(fh)
        if "methods_run" in r:
            results.append(r)
    head = (
        "<!-- generated by spectral_kv.eval.report.write_table from results/*.json; do not edit -->\n"
        "Corpus, model, versions and per-segment numbers are in each run's JSON. Bytes are measured from the "
        "tensors each cache holds, float32 tensors counted at 2 bytes (fp16-equivalent); ratio = fp16 "
        "DynamicCache bytes / that, after the prefill. Fidelity: exact queries of the first continuation "
        "positions over the context K/V as each cache holds it after the prefill, mean over layers.\n\n"
    )
    text = head + render_table(results) + "\n" + render_runs(results)
    with open(path or os.path.join(results_dir, "README_table.md"), "w") as fh:
        fh.write(text)
    return text
