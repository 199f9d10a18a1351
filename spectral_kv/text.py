"""Real English text without a model hub: Python's standard-library documentation (pydoc)."""

from __future__ import annotations

import functools
import os
import pydoc
import re
from unittest import mock

__all__ = ["CORPUS_MODULES", "stdlib_text", "stdlib_tokens", "CORPUS_NAME"]

CORPUS_NAME = "pydoc rendering of CPython stdlib modules"
# Prose-heavy modules first; the order is fixed so every run reads the same text.
CORPUS_MODULES = (
    "collections", "functools", "itertools", "pathlib", "argparse", "logging", "subprocess",
    "threading", "json", "re", "datetime", "typing", "dataclasses", "contextlib", "asyncio",
    "unittest", "email", "http.client", "urllib.request", "sqlite3", "csv", "shutil", "tarfile",
    "zipfile", "socket", "decimal", "fractions", "statistics", "random", "textwrap", "string",
    "inspect", "pickle", "heapq", "bisect", "enum", "abc", "io", "os", "time", "calendar",
)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@functools.lru_cache(maxsize=8)  # every run_eval in a test process renders it
def stdlib_text(modules=CORPUS_MODULES) -> str:
    """Plain-text pydoc of ``modules``, joined (deterministic for a given Python version).

    pydoc prints live module data: ``os.environ`` (the process environment) and object
    reprs with memory addresses. Both would change the text, and with it every segment
    offset, from one process to the next, so the environment is emptied while rendering
    and addresses are removed.
    """
    parts = []
    with mock.patch.dict(os.environ, {}, clear=True):
        for name in modules:
            try:
                doc = pydoc.render_doc(name, renderer=pydoc.plaintext)
            except ImportError:  # a module missing from a trimmed Python: skip it, text stays real
                continue
            parts.append(re.sub(r"\n{3,}", "\n\n", _ADDRESS.sub("", doc)))
    return "\n\n".join(parts)


def stdlib_tokens(tokenizer, n_tokens: int, offset: int = 0) -> list[int]:
    """``n_tokens`` token ids of the corpus starting at token ``offset``.

    Modules are tokenized one at a time until enough text is there (the whole corpus is
    about 400K tokens; a demo needs a few thousand).
    """
    ids: list[int] = []
    for name in CORPUS_MODULES:
        ids += tokenizer(stdlib_text((name,)) + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= offset + n_tokens:
            return ids[offset : offset + n_tokens]
    raise ValueError(f"corpus has {len(ids)} tokens, asked for {n_tokens} from offset {offset}")
