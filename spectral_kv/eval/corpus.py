"""The evaluation corpus: a tuning and a validation split of real text (`spectral_kv.text.SPLITS`).

Each split is two sources, pydoc prose of some stdlib modules and the Python source code of
others (disjoint modules across sources and splits). Presets and allocations are chosen on
``tuning``; quality is reported on ``validation`` only.
"""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import torch

__all__ = ["load_corpus", "quality_offsets", "haystack_range", "rendering_note", "REFERENCE_RENDERING"]

QUALITY_SHARE = 0.7  # of each source: the first 70% feeds perplexity segments, the rest (prose) haystacks

# The text is rendered from a Python's stdlib (pydoc and module source), so it differs between
# Python versions. The package ships one rendering (`spectral_kv.text.split_sources`, "frozen",
# the default); ``rendering="live"`` renders it from the running Python. The README's validation
# numbers (results/validation/validation-*.json, H200 runs) read this rendering, the frozen one:
# split -> (Python version, sha256 of each source's text).
REFERENCE_RENDERING = {
    "validation": ("3.12.3", ("56b82ad65bc121b8a5584bc1c7018219135dbfcf9c54ad9b585e931cd32dc0c5",
                              "c03eaa4aa9a31dc33e274189827a4ef025fbe4fa7d26753a4b98f28d3458c152")),
}


def rendering_note(info: dict[str, Any]) -> str | None:
    """A note when this machine's text of the split is not the rendering the README's numbers read
    (compare methods within one run then, not with the README); None when it is, or has no reference."""
    ref = REFERENCE_RENDERING.get(info["split"])
    if ref is None or tuple(s["sha256"] for s in info["sources"]) == ref[1]:
        return None
    return (f"this text of the {info['split']} split is not the README's runs' (Python {info['python']} "
            f"rendered it, {ref[0]} there; text sha256 differs): compare methods within this run, not with "
            "the README's numbers (the default --corpus frozen reads the README's text)")


def load_corpus(tokenizer, split: str = "validation", max_tokens: int | None = None,
                rendering: str = "frozen") -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids of one split and a description of it for the results.

    Parameters
    ----------
    tokenizer : HF tokenizer (or the byte tokenizer of the tiny test model)
    split : {"validation", "tuning"}
    max_tokens : int, optional
        Keep only the first ``max_tokens`` ids of each source.
    rendering : {"frozen", "live"}
        The text shipped with the package (the same on every machine) or rendered now from this
        Python's stdlib (`spectral_kv.text.split_sources`).

    Returns
    -------
    ids : Tensor[N] int64
        The sources' ids, concatenated in order.
    info : dict
        ``name``, ``split``, ``rendering``, ``python`` (the Python that rendered the text), ``n_tokens``
        and ``sources``: per source ``kind``, ``modules``, ``start`` / ``end`` (token range in
        ``ids``), ``sha256`` of its text and ``n_chars``.
    """
    from spectral_kv.text import frozen_python, split_sources

    ids: list[int] = []
    sources = []
    for kind, text, modules in split_sources(split, rendering):
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_tokens is not None:
            part = part[:max_tokens]
        sources.append({"kind": kind, "modules": list(modules), "start": len(ids), "end": len(ids) + len(part),
                        "sha256": hashlib.sha256(text.encode()).hexdigest(), "n_chars": len(text)})
        ids += part
    info = {
        "name": f"{split} split: pydoc prose + Python source of disjoint CPython stdlib modules",
        "split": split,
        "rendering": rendering,
        "python": frozen_python(split) if rendering == "frozen" else platform.python_version(),
        "n_tokens": len(ids),
        "sources": sources,
    }
    return torch.tensor(ids, dtype=torch.long), info


def quality_offsets(info: dict[str, Any], n_segments: int, length: int) -> list[int]:
    """Start offsets of ``n_segments`` windows of ``length`` tokens, dealt round-robin over the
    sources (pydoc, source, pydoc, ...) and spread evenly over each source's first 70%."""
    from .quality import segment_slices

    srcs = info["sources"]
    counts = [len(range(i, n_segments, len(srcs))) for i in range(len(srcs))]
    per_source = []
    for src, k in zip(srcs, counts):
        if not k:
            per_source.append([])
            continue
        room = int((src["end"] - src["start"]) * QUALITY_SHARE)
        try:
            per_source.append([src["start"] + o for o in segment_slices(room, k, length)])
        except ValueError:
            raise ValueError(
                f"the {src['kind']} source of the {info['split']} split ({room} tokens for quality) cannot hold "
                f"{k} segments of {length}"
            ) from None
    return [per_source[i % len(srcs)][i // len(srcs)] for i in range(n_segments)]


def haystack_range(info: dict[str, Any]) -> tuple[int, int]:
    """Token range of the needle haystacks: the last 30% of the prose (pydoc) source."""
    src = next(s for s in info["sources"] if s["kind"] == "pydoc")
    return src["start"] + int((src["end"] - src["start"]) * QUALITY_SHARE), src["end"]
