"""Save / load a `SpectralCache` as one safetensors file, validated on load.

File layout: every tier tensor of every layer (``layers.{i}.exact_k``, ``layers.{i}.cold_v.basis``,
``layers.{i}.keys`` for layers kept exact...) plus one JSON header in the safetensors metadata
(key ``"spectral_kv"``) holding the `SpectralConfig`, the model identity, per-layer host counts and
a sha256 over the header and every tensor's name, dtype, shape and bytes.

Files record the config, so a storage choice that changes the cold tensors' dtypes
(``value_stats="byte"``: uint8/int8 value statistics) is read back from it; a file from before
such a field existed loads with the field's default (its tensors are that form), and an older
version refuses a file with a field it does not know, naming it.

On load, in this order: the file is readable (else truncated/corrupted), it is a spectral_kv
cache of this format, the checksum matches, the config matches (when one is given), the model
identity matches the target model, and every tensor has the shape and dtype the config and model
imply. Each failure is a `ValueError` naming what mismatched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import torch

from ..._version import __version__
from ...codes import STORAGE_FORMAT
from ...config import SpectralConfig
from ...tiers import TierManager
from .model_config import head_dim, kv_heads, text_config
from .tensor_parallel import local_split, rank_and_world, rank_path, tp_size

__all__ = ["FORMAT", "save_cache", "load_cache", "model_identity"]

FORMAT = "spectral_kv.cache/1"
META_KEY = "spectral_kv"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_EXACT_ATTRS = ("cumulative_length",)  # host ints some transformers exact layers keep


def model_identity(model_config) -> dict[str, Any]:
    """What a saved cache must match: model type, name, layer count, kv heads and head_dim."""
    text = text_config(model_config)
    return {
        "model_type": getattr(text, "model_type", None),
        "name_or_path": getattr(model_config, "_name_or_path", None) or getattr(text, "_name_or_path", None),
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": kv_heads(text),
        "head_dim": head_dim(text),
    }


def _checksum(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _config_dict(config: SpectralConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------- save
def save_cache(cache, path: str | os.PathLike) -> str:
    """Write ``cache`` (a `SpectralCache`) to ``path``; returns the sha256 stored in it.

    A tensor-parallel rank's cache (its layers hold ``num_key_value_heads / world`` heads) goes
    to `tensor_parallel.rank_path` instead, with the rank and world size in the header."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers_meta: list[dict[str, Any]] = []
    dtype = None
    for i, layer in enumerate(cache.layers):
        if _is_spectral(layer):
            if layer._staged:
                raise RuntimeError(f"SpectralCache.save: layer {i} holds staged tokens (called inside a forward pass)")
            state = layer.tiers.state_dict()  # a frozen cache is saved in the dynamic layout (no spare capacity)
            meta = {"kind": "spectral", "initialized": state.pop("initialized")}
            if meta["initialized"]:
                dtype = dtype or state["exact_k"].dtype
                tensors.update({f"layers.{i}.{n}": t for n, t in state.items() if isinstance(t, torch.Tensor)})
                meta.update({n: v for n, v in state.items() if not isinstance(v, torch.Tensor)})
        else:
            initialized = bool(getattr(layer, "is_initialized", False)) and isinstance(getattr(layer, "keys", None), torch.Tensor)
            meta = {"kind": "exact", "class": type(layer).__name__, "initialized": initialized}
            if initialized:
                tensors[f"layers.{i}.keys"] = layer.keys
                tensors[f"layers.{i}.values"] = layer.values
                meta.update({a: int(getattr(layer, a)) for a in _EXACT_ATTRS if hasattr(layer, a)})
        layers_meta.append(meta)
    identity = cache.model_identity
    if identity is None:  # a lazily built cache: what its tensors say
        first = next((t for n, t in tensors.items() if n.endswith((".exact_k", ".keys"))), None)
        identity = {
            "model_type": None,
            "name_or_path": None,
            "num_hidden_layers": len(cache.layers),
            "num_key_value_heads": None if first is None else first.shape[1],
            "head_dim": None if first is None else first.shape[3],
        }
    shard = None
    first = next((t for n, t in tensors.items() if n.endswith(".exact_k")), None)
    if first is not None and identity.get("num_key_value_heads"):
        shard = local_split(first.shape[1], identity["num_key_value_heads"], "SpectralCache.save")
    if shard is not None:
        path = rank_path(path, *shard)
    header = {
        "format": FORMAT,
        "storage_format": STORAGE_FORMAT,
        "tensor_parallel": None if shard is None else {"rank": shard[0], "world": shard[1]},
        "spectral_kv_version": __version__,
        "config": _config_dict(cache.config),
        "model": identity,
        "dtype": None if dtype is None else _DTYPE_NAMES.get(dtype, str(dtype)),
        "layers": layers_meta,
    }
    header["sha256"] = digest = _checksum(header, tensors)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path), metadata={META_KEY: json.dumps(header)})
    return digest


# ---------------------------------------------------------------------- load
def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"spectral_kv cache file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated / garbled files
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {type(exc).__name__}: {exc}"
        ) from exc
    if META_KEY not in metadata:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a spectral_kv cache (no {META_KEY!r} header)")
    try:
        header = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r}: the spectral_kv header is corrupted ({exc})") from exc
    if header.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r}: unsupported cache format {header.get('format')!r}, this version reads {FORMAT!r}")
    if header.get("storage_format", 1) != STORAGE_FORMAT:  # files before the token-axis bit planes have none
        raise ValueError(f"{str(path)!r}: saved with storage format {header.get('storage_format', 1)}, this version reads "
                         f"{STORAGE_FORMAT}: re-create the cache")
    stored = header.pop("sha256", None)
    actual = _checksum(header, tensors)
    if stored != actual:
        raise ValueError(
            f"{str(path)!r}: checksum mismatch (stored sha256 {stored}, contents hash to {actual}): the file is corrupted"
        )
    return header, tensors


def _check_config(saved: dict[str, Any], given: SpectralConfig | None, path) -> SpectralConfig:
    known = {f.name for f in dataclasses.fields(SpectralConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ValueError(f"{str(path)!r}: saved config has fields this version does not know: {unknown}")
    saved_config = SpectralConfig(**saved)
    if given is None:
        return saved_config
    # Compared as configs: a field an older file lacks is its default there (e.g. value_stats,
    # "fp16" before byte statistics existed), and JSON lists are tuples again.
    diff = [
        f"{name}: saved {getattr(saved_config, name)!r}, given {getattr(given, name)!r}"
        for name in sorted(known)
        if name != "verbose" and getattr(saved_config, name) != getattr(given, name)
    ]
    if diff:
        raise ValueError(f"{str(path)!r}: SpectralConfig mismatch ({'; '.join(diff)})")
    return given


def _check_model(saved: dict[str, Any], target: dict[str, Any], path) -> None:
    diff = [
        f"{key}: saved {saved.get(key)!r}, model has {target[key]!r}"
        for key in target
        if saved.get(key) is not None and saved.get(key) != target[key]
    ]
    if diff:
        raise ValueError(f"{str(path)!r} was saved for another model ({'; '.join(diff)})")


def _expect(cond: bool, path, what: str) -> None:
    if not cond:
        raise ValueError(f"{str(path)!r}: {what}")


def _layer_devices(model, n: int, device) -> list[torch.device]:
    if device is not None:
        return [torch.device(device)] * n
    if model is None:
        return [torch.device("cpu")] * n
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    blocks = getattr(decoder, "layers", None)
    if blocks is not None and len(blocks) >= n:
        return [next(b.parameters()).device for b in list(blocks)[:n]]
    return [next(model.parameters()).device] * n


def _is_spectral(layer) -> bool:
    return isinstance(getattr(layer, "tiers", None), TierManager)


def load_cache(path: str | os.PathLike, model_or_config, *, config: SpectralConfig | None = None, device=None,
               make_cache=None):
    """Read a cache written by `save_cache`, validated against the model it will serve.

    Parameters
    ----------
    path : str or PathLike
    model_or_config : transformers model or its config
        The model the cache will continue with. With a model, each layer's tensors go to the
        device of that decoder layer (``device_map`` splits included) and its dtype is checked.
    config : SpectralConfig, optional
        When given, must equal the saved one (``verbose`` aside); default: the saved config.
    device : optional
        Put every layer here instead.
    make_cache : callable ``(SpectralConfig, model_config) -> SpectralCache``
        Builds the empty cache to fill (`SpectralCache.load` passes its class).
    """
    if make_cache is None:
        raise ValueError("load_cache needs make_cache (use SpectralCache.load)")
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    model_config = model.config if model is not None else model_or_config
    rank, world = rank_and_world()
    sharded = world > 1 and (tp_size(model) > 1 if model is not None else not os.path.exists(path))
    if sharded:  # this rank's file (tensor parallelism: each rank saved its own KV heads)
        path = rank_path(path, rank, world)
    header, tensors = _read(path)
    saved_tp = header.get("tensor_parallel")
    if saved_tp != (None if not sharded else {"rank": rank, "world": world}):
        said = "one process" if saved_tp is None else f"rank {saved_tp['rank']} of {saved_tp['world']}"
        now = f"rank {rank} of {world}" if sharded else "one process"
        raise ValueError(f"{str(path)!r} was saved by {said} (tensor parallelism), it is loaded by {now}: load it "
                         f"in the same tensor-parallel layout")
    cfg = _check_config(header["config"], config, path)
    target = model_identity(model_config)
    _check_model(header["model"], target, path)
    dtype = header.get("dtype")
    if model is not None and dtype is not None and _DTYPE_NAMES.get(model.dtype, str(model.dtype)) != dtype:
        raise ValueError(f"{str(path)!r} holds {dtype} keys/values, the model runs in {model.dtype}")
    cache = make_cache(cfg, model_config)
    cache.config = cfg
    metas = header["layers"]
    _expect(len(metas) == len(cache.layers), path, f"saved {len(metas)} layers, the model's cache has {len(cache.layers)}")
    devices = _layer_devices(model, len(metas), device)
    heads, head_dim = target["num_key_value_heads"] // (saved_tp["world"] if saved_tp else 1), target["head_dim"]
    used: set[str] = set()
    for i, (layer, meta, dev) in enumerate(zip(cache.layers, metas, devices)):
        kind = "spectral" if _is_spectral(layer) else "exact"
        _expect(meta.get("kind") == kind, path, f"layer {i} was saved as {meta.get('kind')!r}, the model's layer is {kind!r}")
        if not meta.get("initialized"):
            continue

        def get(name: str) -> torch.Tensor:
            key = f"layers.{i}.{name}"
            _expect(key in tensors, path, f"tensor {key!r} is missing")
            used.add(key)
            return tensors[key]

        if kind == "exact":
            k, v = get("keys"), get("values")
            _expect(k.shape == v.shape and k.dim() == 4 and k.shape[1] == heads and k.shape[3] == head_dim, path,
                    f"layer {i} keys/values shaped {tuple(k.shape)}/{tuple(v.shape)}, expected [batch, {heads}, tokens, {head_dim}]")
            k, v = k.to(dev), v.to(dev)
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            for attr in _EXACT_ATTRS:
                if attr in meta:
                    setattr(layer, attr, meta[attr])
            continue
        tm = layer.tiers  # per layer: `layer_overrides` can give layers different cold layouts
        specs = {role: comp.part_specs(head_dim)
                 for role, comp in (("cold_k", tm.key_compressor), ("cold_v", tm.value_compressor))}
        ek, ev = get("exact_k"), get("exact_v")
        n_exact, n_cold, tail, seen = meta["n_exact"], meta["n_cold"], meta["tail_valid"], meta["seen"]
        b = len(n_exact)
        _expect(ek.dim() == 4 and ek.shape == ev.shape and tuple(ek.shape[:2]) == (b, heads) and ek.shape[3] == head_dim,
                path, f"layer {i} exact keys/values shaped {tuple(ek.shape)}/{tuple(ev.shape)}, expected [{b}, {heads}, W, {head_dim}]")
        _expect(str(ek.dtype).removeprefix("torch.") == dtype and ek.dtype == ev.dtype, path,
                f"layer {i} exact tiers are {ek.dtype}/{ev.dtype}, the header says {dtype}")
        _expect(len(n_cold) == b and len(tail) == b, path, f"layer {i} per-row counts disagree with batch {b}")
        _expect(ek.shape[2] == max(n_exact, default=0) and min(n_exact, default=0) >= 0, path,
                f"layer {i} exact width {ek.shape[2]} does not match its counts {n_exact}")
        tokens = [e + c * cfg.block_size for e, c in zip(n_exact, n_cold)]
        _expect(all(0 <= t <= n for t, n in zip(tail, tokens)) and all(n <= seen for n in tokens), path,
                f"layer {i} counts are inconsistent (tokens {tokens}, trailing {tail}, positions {seen})")
        _expect(all(c == 0 or e >= cfg.sink_tokens for e, c in zip(n_exact, n_cold)), path,
                f"layer {i} rows with cold blocks must hold their {cfg.sink_tokens} sinks")
        pools = {}
        for role, spec in specs.items():
            nb = max(n_cold, default=0)
            names = sorted(n.split(".")[-1] for n in tensors if n.startswith(f"layers.{i}.{role}."))
            _expect(names == (sorted(spec) if nb else []), path,
                    f"layer {i} {role} holds parts {names}, the config's compressor stores {sorted(spec) if nb else []}")
            parts = {}
            for part, (shape, pdtype) in spec.items() if nb else ():
                t = get(f"{role}.{part}")
                want = (b, heads, nb, *shape)
                _expect(tuple(t.shape) == want and t.dtype == pdtype, path,
                        f"layer {i} {role}.{part} is {t.dtype} {tuple(t.shape)}, expected {pdtype} {want}")
                parts[part] = t.to(dev)
            pools[role] = parts
        state = {"initialized": True, "exact_k": ek.to(dev), "exact_v": ev.to(dev), "n_exact": n_exact, "n_cold": n_cold,
                 "tail_valid": tail, "seen": seen}
        for role, parts in pools.items():
            state.update({f"{role}.{part}": t for part, t in parts.items()})
        for role, comp in (("shared_k", tm.key_compressor), ("shared_v", tm.value_compressor)):
            spec = comp.shared_specs(head_dim)
            names = sorted(n.split(".")[-1] for n in tensors if n.startswith(f"layers.{i}.{role}."))
            allowed = [sorted(spec)] if any(meta.get("fitted", ())) else [[], sorted(spec)]
            _expect(names in allowed, path,
                    f"layer {i} {role} holds {names}, the config's compressor keeps {sorted(spec)} per row")
            for name, (shape, sdtype) in spec.items() if names else ():
                t = get(f"{role}.{name}")
                want = (b, heads, *shape)
                _expect(tuple(t.shape) == want and t.dtype == sdtype, path,
                        f"layer {i} {role}.{name} is {t.dtype} {tuple(t.shape)}, expected {sdtype} {want}")
                state[f"{role}.{name}"] = t.to(dev)
        if "fitted" in meta:
            _expect(len(meta["fitted"]) == b, path, f"layer {i} per-row fitted flags disagree with batch {b}")
            state["fitted"] = meta["fitted"]
        tm.load_state_dict(state)
        layer.lazy_initialization(tm.exact_k, tm.exact_v)
    extra = sorted(set(tensors) - used)
    _expect(not extra, path, f"unexpected tensors {extra[:5]}")
    return cache
