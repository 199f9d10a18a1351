"""Experiment (issue 14, lever "per-layer budgets"): per-layer bit budgets on SmolLM2-135M.

One global layout serves all 30 layers today. This run measures what each group of layers costs
when only it is stored cheaper, and then mixes layouts per layer. Nothing in the library changes:
the hack lives in this process. A ``perlayer`` method family is added to the eval harness; its
cache is the base layout's `SpectralCache` with some ``cache.layers[i]`` replaced by a
`SpectralLayer` of another layout (each layer owns its `TierManager` and strategy, so that is a
complete per-layer cache; `SpectralCache.config` stays the base's, unread by the teacher-forced
runs).

Spec: ``perlayer:base=NAME,NAME2=LAYERS,...`` with NAME one of `LAYOUTS` and LAYERS e.g.
``0-2`` or ``0-2/5/27-29`` (``/`` joins, ``+`` is the harness's composition).

    PYTHONPATH=. python results/experiments/per_layer_budget.py eval --split tuning --segments 3 \
        --context 3584 --continuation 512 --chunk 64 --no-niah --out results/experiments/per_layer_budget \
        --tag sens --methods 'perlayer:base=hi;perlayer:base=hi,lo=0-2;...'
    PYTHONPATH=. python results/experiments/per_layer_budget.py table results/experiments/per_layer_budget/sens.json

``table`` prints, per method, the cold ratio from the bytes held (`memory_report` totals at the
end of each segment: cold keys + values against the fp16 bytes of the cold tokens), ΔPPL, top-1
agreement and next-token KL vs the exact cache, and the deltas to the first method (paired by
segment).
"""

from __future__ import annotations

import json
import sys

# Layouts at head_dim 64 (bytes per cold token per KV head, fp16 dense = 256 B): hadamard keys
# 8*b B of codes + 256/group B of fp16 stats per channel; values 8*b B + 2 B byte stats.
# All keep the compact preset's 256-token hot tier (the cold ratio does not depend on it), so
# layers differ only in their cold storage.
LAYOUTS = {
    "hi": dict(preset="balanced", value_stats="byte", quant_group=256, hot_buffer_size=256),  # K4/V3 59 B
    "mid": dict(preset="compact", value_stats="byte", quant_group=256),  # K3/V3 51 B: the 5.02x point
    "lo": dict(preset="max-compression", value_stats="byte", quant_group=256, hot_buffer_size=256),  # K3/V2 43 B
    "k4v2": dict(preset="balanced", value_bits=2, value_stats="byte", quant_group=256, hot_buffer_size=256),  # 51 B
}


def layout_config(name: str):
    from spectral_kv import SpectralConfig

    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}")
    fields = dict(LAYOUTS[name])
    return SpectralConfig.preset(fields.pop("preset"), **fields, verbose=False)


def parse_layers(text: str, n_layers: int = 30) -> list[int]:
    """``"0-2/5"`` -> ``[0, 1, 2, 5]`` (ValueError naming a bad part or index)."""
    out: list[int] = []
    for part in text.split("/"):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad layer range {part!r} in {text!r}") from None
        if not 0 <= a <= b < n_layers:
            raise ValueError(f"layer range {part!r} outside 0..{n_layers - 1}")
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"layer given twice in {text!r}")
    return out


def build_perlayer(spec: str, name: str, opts: dict[str, str]):
    from spectral_kv.eval.methods.spectral import SpectralMethod
    from spectral_kv.integrations.transformers.cache import SpectralLayer
    from spectral_kv.integrations.transformers.model_config import text_config

    base_name = opts.pop("base", "mid")
    base = layout_config(base_name)
    overrides: dict[int, str] = {}
    for lay in [k for k in opts if k in LAYOUTS]:
        for i in parse_layers(opts.pop(lay)):
            if i in overrides:
                raise ValueError(f"layer {i} given two layouts in {spec!r}")
            overrides[i] = lay

    class PerLayerMethod(SpectralMethod):
        def new_cache(self, model):
            cache = super().new_cache(model)
            text = text_config(model.config)
            for i, lay in overrides.items():
                cache.layers[i] = SpectralLayer(layout_config(lay), i, text)
            return cache

    settings = {"base": base_name, "overrides": {str(i): v for i, v in sorted(overrides.items())},
                "layouts": LAYOUTS, "_config": base}
    return PerLayerMethod(spec, "spectral", settings)


def _cold_ratio(rep: dict) -> float:
    """fp16 bytes of the cold tokens / bytes stored for them. ``dense_bytes`` counts every token
    in the exact tiers' dtype (float32 here, 4 B), so cold tokens' dense bytes = dense - exact tiers."""
    exact_dtype_bytes = rep["dense_bytes"] - rep["sinks"] - rep["warm"] - rep["hot"]
    return exact_dtype_bytes / 2 / (rep["cold_keys"] + rep["cold_values"])


def table(paths: list[str]) -> None:
    rows = {}
    for path in paths:
        q = json.load(open(path))["quality"]
        for spec, r in q["methods"].items():
            rows.setdefault(spec, []).extend(r["per_segment"])
    ref = None
    print(f"{'method':52s} {'cold':>6s} {'dPPL':>7s} {'top1':>6s} {'KL':>7s} | {'d top1':>7s} {'d KL':>8s}  per-segment top1")
    for spec, segs in rows.items():
        if spec == "exact":
            continue
        cold = [_cold_ratio(s["spectral_memory_report"]) for s in segs]
        delta = [s["delta"] for s in segs]
        top1 = [s["top1_agreement"] for s in segs]
        kl = [s["next_token_kl"] for s in segs]
        if ref is None:
            ref = (top1, kl)
        m = lambda xs: sum(xs) / len(xs)  # noqa: E731
        dt = m([a - b for a, b in zip(top1, ref[0])])
        dk = m([a - b for a, b in zip(kl, ref[1])])
        print(f"{spec:52s} {m(cold):5.2f}x {m(delta):+7.3f} {m(top1):6.4f} {m(kl):7.4f} | {dt:+7.4f} {dk:+8.4f}  "
              + " ".join(f"{t:.3f}" for t in top1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"]:
        table(sys.argv[2:])
        sys.exit(0)
    if sys.argv[1:2] != ["eval"]:
        sys.exit("usage: per_layer_budget.py eval [spectral-kv eval options] | table RESULT.json ...")
    from spectral_kv.eval.methods import BUILDERS
    from spectral_kv.eval.run import main as eval_main

    BUILDERS["perlayer"] = build_perlayer
    sys.exit(eval_main(sys.argv[2:]))
