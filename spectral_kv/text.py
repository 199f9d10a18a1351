"""Real English text without a model hub: Python's standard-library documentation (pydoc)."""

from __future__ import annotations

import functools
import os
import pydoc
import re
from unittest import mock

__all__ = [
    "CORPUS_MODULES", "stdlib_text", "stdlib_tokens", "CORPUS_NAME", "SPLITS", "stdlib_source", "split_sources",
]

CORPUS_NAME = "pydoc rendering of CPython stdlib modules"
# Prose-heavy modules first; the order is fixed so every run reads the same text.
CORPUS_MODULES = (
    "collections", "functools", "itertools", "pathlib", "argparse", "logging", "subprocess",
    "threading", "json", "re", "datetime", "typing", "dataclasses", "contextlib", "asyncio",
    "unittest", "email", "http.client", "urllib.request", "sqlite3", "csv", "shutil", "tarfile",
    "zipfile", "socket", "decimal", "fractions", "statistics", "random", "textwrap", "string",
    "inspect", "pickle", "heapq", "bisect", "enum", "abc", "io", "os", "time", "calendar",
)


# Tuning / validation split (disjoint modules; no choice of a preset or allocation is made on
# validation). Each split holds two kinds of real text: pydoc prose of some modules and the
# Python source code of others, no module in two places (a module's source contains its
# docstrings, so source modules are never pydoc modules either). The Debian python3.*-doc
# packages are reserved for independent checks and are used by neither split.
SPLITS = {
    "tuning": {
        "pydoc": CORPUS_MODULES[0::2],
        "source": ("configparser", "optparse", "tokenize", "smtplib", "ftplib", "tempfile", "shlex", "queue"),
    },
    "validation": {
        "pydoc": CORPUS_MODULES[1::2],
        "source": ("difflib", "pdb", "imaplib", "mailbox", "weakref", "pprint", "gettext", "uuid", "plistlib"),
    },
}


@functools.lru_cache(maxsize=8)
def stdlib_source(modules: tuple[str, ...]) -> str:
    """The Python source files of ``modules`` as shipped with this interpreter, joined (each
    preceded by a ``# file: name.py`` line). Modules without a Python source are skipped."""
    import importlib
    import inspect

    parts = []
    for name in modules:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError):
            continue
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            parts.append(f"# file: {name.replace('.', '/')}.py\n" + f.read())
    return "\n\n".join(parts)


# The splits' text as one Python rendered it (the README's numbers read it), shipped with the
# package: pydoc output and module source differ between Python versions, so a live rendering
# would make every machine evaluate slightly different text. `python -m spectral_kv.text --freeze`
# writes them from the running Python.
FROZEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval", "corpus_data")
RENDERINGS = ("frozen", "live")


def split_sources(split: str, rendering: str = "frozen") -> list[tuple[str, str, tuple[str, ...]]]:
    """``[(kind, text, modules), ...]`` of a split (``"tuning"`` or ``"validation"``), pydoc first.

    ``rendering``: ``"frozen"`` (default) the text shipped in ``eval/corpus_data/`` (rendered once by
    the Python it names, `frozen_python`), the same on every machine; ``"live"`` rendered now from
    this interpreter's stdlib.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if rendering not in RENDERINGS:
        raise ValueError(f"rendering must be one of {RENDERINGS}, got {rendering!r}")
    if rendering == "frozen":
        return _frozen(split)[1]
    s = SPLITS[split]
    return [("pydoc", stdlib_text(tuple(s["pydoc"])), tuple(s["pydoc"])),
            ("source", stdlib_source(tuple(s["source"])), tuple(s["source"]))]


def frozen_python(split: str) -> str:
    """The Python version that rendered the shipped text of ``split``."""
    return _frozen(split)[0]


@functools.lru_cache(maxsize=4)
def _frozen(split: str) -> tuple[str, list[tuple[str, str, tuple[str, ...]]]]:
    import json
    import lzma

    path = os.path.join(FROZEN_DIR, f"{split}.json.xz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"the frozen text of the {split!r} split is missing ({path}); reinstall the package, "
                                "or pass rendering='live' (--corpus live) to render it from this Python")
    with lzma.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    want = SPLITS[split]
    got = {s["kind"]: tuple(s["modules"]) for s in data["sources"]}
    if got != {k: tuple(v) for k, v in want.items()}:
        raise ValueError(f"{path} holds modules {got}, but SPLITS[{split!r}] names {want}: re-freeze it "
                         "(python -m spectral_kv.text --freeze)")
    return data["python"], [(s["kind"], s["text"], tuple(s["modules"])) for s in data["sources"]]


def freeze(out_dir: str = FROZEN_DIR) -> list[str]:
    """Render every split from this Python and write ``{split}.json.xz`` into ``out_dir``."""
    import json
    import lzma
    import platform

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for split in SPLITS:
        data = {"python": platform.python_version(), "split": split,
                "sources": [{"kind": k, "modules": list(m), "text": t} for k, t, m in split_sources(split, "live")]}
        path = os.path.join(out_dir, f"{split}.json.xz")
        with lzma.open(path, "wt", encoding="utf-8", preset=9) as f:
            json.dump(data, f)
        paths.append(path)
    return paths


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


if __name__ == "__main__":  # python -m spectral_kv.text --freeze [DIR]
    import sys

    if len(sys.argv) < 2 or sys.argv[1] != "--freeze":
        sys.exit("usage: python -m spectral_kv.text --freeze [DIR]")
    for p in freeze(*sys.argv[2:3]):
        print(p, os.path.getsize(p))
