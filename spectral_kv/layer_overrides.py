"""`SpectralConfig.layer_overrides`: per-layer cold-storage layouts, parsed into one canonical form.

Layers differ in how much their cold-storage error costs the model's output (SmolLM2-135M: one of
30 layers stored at 3-bit keys / 2-bit values instead of 4 / 3 costs as much next-token KL as all
the other 29 together; `results/TUNING_NOTES.md`), so a mix of layouts beats one global layout at
the same bytes. Only the cold storage may differ per layer (`config.OVERRIDABLE_FIELDS`): the tiers (block,
sinks, hot tier, lag) and the attention choice stay global, so every layer holds the same tokens
exactly and a saved cache's counts mean the same in every layer.

Canonical form (hashable, equal after a JSON round trip): a tuple of ``(layers, fields)`` pairs
ordered by first layer, ``layers`` a sorted tuple of layer indices, ``fields`` a tuple of
``(name, value)`` pairs sorted by name, list values turned into tuples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["normalize_layer_overrides", "describe_layers"]


def _tupled(value: Any) -> Any:
    """Lists (JSON, CLI) become tuples, recursively, so the form is hashable and compares equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


def _layer_indices(key: Any) -> tuple[int, ...]:
    """An int, a ``range`` or a sequence of ints -> sorted indices (ValueError naming a bad one)."""
    items = list(key) if isinstance(key, (range, list, tuple)) else [key]
    if not items:
        raise ValueError(f"layer_overrides: an empty set of layers {key!r}")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"layer_overrides: layer index must be a non-negative int, got {i!r} (in {key!r})")
    if len(set(items)) != len(items):
        raise ValueError(f"layer_overrides: a layer listed twice in {key!r}")
    return tuple(sorted(items))


def normalize_layer_overrides(value: Any, known_fields: set[str], overridable: tuple[str, ...]) -> tuple | None:
    """The canonical form of ``layer_overrides`` (see the module docstring).

    Parameters
    ----------
    value : None, mapping or sequence of pairs
        ``{layers: {field: value}}`` with ``layers`` an int, a ``range`` or a sequence of ints,
        or the canonical form itself (also as nested lists, as JSON gives it back).
    known_fields : set of str
        Every `SpectralConfig` field (an unknown one is named as such).
    overridable : tuple of str
        The fields a layer may change.

    Returns
    -------
    tuple or None
        ``None`` for ``None`` or an empty mapping.
    """
    if value is None:
        return None
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)):
        pairs = list(value)
        for p in pairs:
            if not (isinstance(p, (list, tuple)) and len(p) == 2):
                raise ValueError(f"layer_overrides: want {{layers: {{field: value}}}} or (layers, fields) pairs, got {p!r}")
    else:
        raise ValueError(f"layer_overrides must be a mapping {{layers: {{field: value}}}} or None, got {value!r}")
    out, seen = [], {}
    for key, fields in pairs:
        layers = _layer_indices(key)
        if isinstance(fields, Mapping):
            items = list(fields.items())
        elif isinstance(fields, (list, tuple)) and all(isinstance(f, (list, tuple)) and len(f) == 2 for f in fields):
            items = [tuple(f) for f in fields]
        else:
            raise ValueError(f"layer_overrides[{key!r}] must be a mapping of field -> value, got {fields!r}")
        if not items:
            raise ValueError(f"layer_overrides[{key!r}] changes no field")
        for name, _ in items:
            if name not in known_fields:
                raise ValueError(f"layer_overrides[{key!r}]: unknown SpectralConfig field {name!r}")
            if name not in overridable:
                raise ValueError(
                    f"layer_overrides[{key!r}]: {name!r} cannot differ per layer (only the cold layout can: "
                    f"{sorted(overridable)}); the tiers and the attention stay global"
                )
        if len({n for n, _ in items}) != len(items):
            raise ValueError(f"layer_overrides[{key!r}]: a field given twice")
        for i in layers:
            if i in seen:
                raise ValueError(f"layer_overrides: layer {i} is given twice ({seen[i]!r} and {key!r})")
            seen[i] = key
        out.append((layers, tuple(sorted((n, _tupled(v)) for n, v in items))))
    return tuple(sorted(out)) or None


def describe_layers(layers: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in layers:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
