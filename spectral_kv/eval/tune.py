"""Offline tuning of shared-basis layouts on captured K/V of the TUNING split (never validation).

``python -m spectral_kv.eval.tune capture OUT.pt`` runs the model once per tuning segment
(prefill of ``context`` tokens, then ``queries`` teacher-forced tokens whose post-RoPE queries
are kept) and saves every layer's context K/V and those queries. ``evaluate`` then scores a
candidate layout the way the cache would hold that context (first ``sinks`` tokens exact, whole
``block_size`` blocks cold, the newest ``>= hot`` tokens exact) by the attention fidelity of the
exact queries (`spectral_kv.eval.fidelity.layer_fidelity`), and its cold-storage ratio: fp16
bytes of a block / bytes stored for it, scales and the per-row basis (amortized over the row's
cold blocks) included. These are tuning numbers, not quality results.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from spectral_kv import SpectralConfig
from spectral_kv.compressors import COMPRESSORS

from .fidelity import layer_fidelity

__all__ = ["capture", "evaluate", "block_bytes", "distortion_tables", "sweep"]


@torch.inference_mode()
def capture(path: str, segments: int = 2, context: int = 3584, queries: int = 64, threads: int | None = None) -> None:
    """Capture K/V and queries of ``segments`` tuning segments into ``path``."""
    from spectral_kv.models import load_default_model
    from transformers import DynamicCache

    from .capture import capture_queries
    from .corpus import load_corpus, quality_offsets

    if threads:
        torch.set_num_threads(threads)
    model, tok = load_default_model(progress=False)
    ids, info = load_corpus(tok, "tuning")
    out = []
    for off in quality_offsets(info, segments, context + queries):
        ctx, cont = ids[off : off + context], ids[off + context : off + context + queries]
        cache = DynamicCache(config=model.config)
        with capture_queries(model, queries, context) as qs:
            model(ctx[None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            kv = [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]
            pos = torch.arange(context, context + queries)
            model(cont[None], past_key_values=cache, use_cache=True, cache_position=pos, position_ids=pos[None], logits_to_keep=1)
        out.append({"offset": off, "kv": kv, "q": [qs[i][0] for i in range(len(kv))]})
        print(f"captured segment @ {off}", flush=True)
    torch.save({"split": "tuning", "corpus": info, "segments": out}, path)


def block_bytes(config: SpectralConfig, head_dim: int, n_blocks: int) -> dict[str, float]:
    """Bytes of one cold block per KV head per role (``keys``, ``values``), the shared per-row
    state amortized over ``n_blocks``, and the cold-storage ratio vs fp16."""
    out = {}
    for role in ("keys", "values"):
        comp = COMPRESSORS[config.compressor_name(role)](config, role, config.rank(role))
        specs = comp.part_specs(head_dim)
        b = sum(torch.Size(s).numel() * torch.empty(0, dtype=dt).element_size() for s, dt in specs.values())
        shared = getattr(comp, "shared_specs", lambda d: {})(head_dim)
        b += sum(torch.Size(s).numel() * torch.empty(0, dtype=dt).element_size() for s, dt in shared.values()) / n_blocks
        out[role] = b
    out["ratio"] = 2 * config.block_size * head_dim * 2 / (out["keys"] + out["values"])
    return out


def _roundtrip(comp, x: torch.Tensor) -> torch.Tensor:
    """Compress and rebuild ``x`` [H, L, D] (L whole blocks) as the cache would: one basis per head."""
    h, n, d = x.shape
    t = comp.config.block_size
    blocks = x.reshape(h * (n // t), t, d)
    if getattr(comp, "shared_specs", None) and comp.shared_specs(d):  # a per-row fitted basis
        basis = comp.fit(x[None])["basis"][0]  # [H, D, D]
        shared = {"basis": basis.repeat_interleave(n // t, 0)}
        return comp.decompress(comp.compress(blocks, shared), torch.float32, shared).reshape(h, n, d)
    return comp.decompress(comp.compress(blocks), torch.float32).reshape(h, n, d)


def evaluate(data: dict[str, Any], config: SpectralConfig, layers: list[int] | None = None,
             per_layer: dict[int, SpectralConfig] | None = None) -> dict[str, float]:
    """Mean attention fidelity over layers and segments of ``config`` (or ``per_layer`` configs)."""
    rows = []
    ratios = []
    for seg in data["segments"]:
        for i, ((k, v), q) in enumerate(zip(seg["kv"], seg["q"])):
            if layers is not None and i not in layers:
                continue
            cfg = (per_layer or {}).get(i, config)
            n = k.shape[1]
            nb = (n - cfg.sink_tokens - cfg.hot_buffer_size) // cfg.block_size
            a, b = cfg.sink_tokens, cfg.sink_tokens + nb * cfg.block_size
            kk, vv = k.clone().float(), v.clone().float()
            for x, role in ((kk, "keys"), (vv, "values")):
                comp = COMPRESSORS[cfg.compressor_name(role)](cfg, role, cfg.rank(role))
                x[:, a:b] = _roundtrip(comp, x[:, a:b])
            rows.append(layer_fidelity(q.float(), k.float(), v.float(), kk, vv))
            ratios.append(block_bytes(cfg, k.shape[-1], nb)["ratio"])
    keys = rows[0].keys()
    out = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    out["max_output_rel_err"] = max(r["output_rel_err"] for r in rows)
    out["cold_ratio"] = sum(ratios) / len(ratios)
    return out


def distortion_tables(data: dict[str, Any], config: SpectralConfig, role: str, unit: int = 16) -> list[list[list[float]]]:
    """Per layer: the measured ``dist[u][b]`` of the cold tokens (summed over heads and segments),
    each layer's table divided by its energy so layers weigh alike when summed."""
    comp = COMPRESSORS["spectral_quant"](config, role, None)
    tables = []
    for i in range(len(data["segments"][0]["kv"])):
        acc = None
        for seg in data["segments"]:
            x = seg["kv"][i][0 if role == "keys" else 1].float()
            n = x.shape[1]
            nb = (n - config.sink_tokens - config.hot_buffer_size) // config.block_size
            x = x[:, config.sink_tokens : config.sink_tokens + nb * config.block_size]
            h, L, d = x.shape
            basis = comp.fit(x[None])["basis"][0]
            t = config.block_size
            shared = {"basis": basis.repeat_interleave(L // t, 0)}
            dist = torch.tensor(comp.measure_distortion(x.reshape(h * (L // t), t, d), shared, unit))
            acc = dist if acc is None else acc + dist
        tables.append((acc / acc[:, 0].sum()).tolist())
    return tables


def sweep(path: str, key_budgets=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0), value_budgets=(1.5, 2.0, 2.5, 3.0, 3.5, 4.0),
          baselines: bool = False) -> list[dict]:
    """Score the Hadamard presets and DP allocations (one layout for every layer) at each
    budget pair; print one line per candidate and return the rows."""
    from spectral_kv.allocate import allocate

    data = torch.load(path)
    base = dict(block_size=512, hot_buffer_size=64, sink_tokens=4, verbose=False)
    rows = []

    def run(name, cfg, **extra):
        r = {"name": name, **extra, **evaluate(data, cfg)}
        rows.append(r)
        print(f"{name:60s} ratio {r['cold_ratio']:.2f}x out_err {r['output_rel_err']:.4f} "
              f"max {r['max_output_rel_err']:.4f} kl {r['kl']:.5f}", flush=True)

    if baselines:
        run("hadamard K4/V3 (balanced)", SpectralConfig(compressor="hadamard", coeff_bits=4, value_bits=3, **base))
        run("hadamard K3/V2 (max-compression)", SpectralConfig(compressor="hadamard", coeff_bits=3, value_bits=2, **base))
    probe = SpectralConfig(compressor="spectral_quant", **base)
    tables = {role: distortion_tables(data, probe, role) for role in ("keys", "values")}
    glob = {role: [[sum(t[u][b] for t in tables[role]) for b in range(9)] for u in range(len(tables[role][0]))]
            for role in tables}
    units = [16] * len(glob["keys"])
    for kb in key_budgets:
        ks = allocate(glob["keys"], units, kb, merge=True)
        for vb in value_budgets:
            vs = allocate(glob["values"], units, vb, segment_overhead=32, merge=True)
            cfg = SpectralConfig(compressor="spectral_quant", key_segments=ks, value_segments=vs, **base)
            run(f"sq K{ks} V{vs}", cfg, key_budget=kb, value_budget=vb, key_segments=ks, value_segments=vs)
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "capture":
        capture(sys.argv[2], threads=1)
    elif len(sys.argv) >= 3 and sys.argv[1] == "sweep":
        # optional: comma-separated key and value budgets (bits per coefficient)
        budgets = [tuple(float(b) for b in a.split(",")) for a in sys.argv[3:5]]
        sweep(sys.argv[2], *budgets)
    else:
        raise SystemExit("usage: python -m spectral_kv.eval.tune capture|sweep OUT.pt")
