"""`compile_attend`: a strategy's ``attend`` under ``torch.compile(fullgraph=True, dynamic=True)``.

The cache grows along two axes during decoding: exact tokens ``Te`` every step and cold blocks
``NB`` every ``block_size`` steps. Both must stay symbolic or each growth step recompiles.
Two shape-env settings are applied while the compiled function runs (they matter when it
traces):

* ``backed_size_oblivious``: without it an input dim of size 1 is specialised, so the first
  cold block would compile a graph for ``NB == 1`` and the second block another one.
* ``use_duck_shape=False``: without it two dims that happen to be equal when tracing (say
  ``Te == 32 == Hq``) are assumed equal forever and the next step recompiles.

What is left is one graph without cold blocks (the ``if cold_k:`` branch) and one with them,
plus one per distinct non-shape input structure (``cold_valid`` / ``exact_mask`` None or a
tensor: ragged batches). tests/test_compile.py asserts that bound.

Constants a compressor builds lazily and caches (``hadamard``'s rotation, per head_dim and
device) are read as graph constants; the first ``compress`` builds them, before any cold block
reaches ``attend``. If the first trace builds one instead (e.g. a cache restored from disk onto
another device), its new cache entry costs one more graph, once.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["compile_attend", "shape_settings"]


def shape_settings():
    """Context manager with the shape-env settings above (those this torch version has)."""
    import torch.fx.experimental._config as fx_config

    wanted = {"backed_size_oblivious": True, "use_duck_shape": False}
    known = {k: v for k, v in wanted.items() if k in getattr(fx_config, "_config", {})}
    return fx_config.patch(**known) if known else contextlib.nullcontext()


def compile_attend(strategy, backend="inductor", **options):
    """``strategy.attend`` compiled with ``fullgraph=True, dynamic=True`` (graph breaks raise).

    Parameters
    ----------
    strategy : AttentionStrategy
    backend : str or callable
        A ``torch.compile`` backend (tests pass a counting backend).
    options : extra ``torch.compile`` keyword arguments.
    """
    compiled = torch.compile(strategy.attend, fullgraph=True, dynamic=True, backend=backend, **options)

    def attend(*args, **kwargs):
        with shape_settings():
            return compiled(*args, **kwargs)

    attend.compiled = compiled
    return attend
