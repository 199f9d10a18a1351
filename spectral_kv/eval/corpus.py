"""The evaluation corpus: rendered Python standard-library documentation (pydoc)."""

from __future__ import annotations

import hashlib
import platform
from typing import Any

import torch

__all__ = ["load_corpus"]


def load_corpus(tokenizer, max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token ids of the pydoc corpus and a description of it for the results.

    Parameters
    ----------
    tokenizer : HF tokenizer (or the byte tokenizer of the tiny test model)
    max_tokens : int, optional
        Keep only the first ``max_tokens`` ids.

    Returns
    -------
    ids : Tensor[N] int64
    info : dict
        ``name``, ``modules``, ``python`` (the pydoc text depends on the Python version),
        ``sha256`` of the text and ``n_tokens``.
    """
    from spectral_kv.text import CORPUS_MODULES, CORPUS_NAME, stdlib_text

    text = stdlib_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    info = {
        "name": CORPUS_NAME,
        "modules": list(CORPUS_MODULES),
        "python": platform.python_version(),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "n_chars": len(text),
        "n_tokens": len(ids),
    }
    return torch.tensor(ids, dtype=torch.long), info
