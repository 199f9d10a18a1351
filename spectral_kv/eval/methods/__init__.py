"""Named cache methods the harness compares, each built from a spec string.

A spec is ``name`` or ``name:key=value,key=value``; for example ``exact``,
``spectral:preset=original`` (the original design), ``kivi2``, ``quanto:bits=4``,
``snapkv:ratio=0.75``; two specs joined by ``+`` compose a press with the spectral tiers
(``snapkv:ratio=0.5+spectral:preset=balanced``). Families, one file each:

* ``exact`` (`exact.py`) - transformers ``DynamicCache``.
* ``spectral`` (`spectral.py`) - this library: ``preset=`` (``original``, ``fast``, ``balanced``,
  ``max-compression``; default: the library default `SpectralConfig()`) then options ``k``,
  ``v``, ``sink``, ``bits``, ``vbits``, ``group``, ``block``, ``hot``, ``compressor``, ``vstats`` (``value_stats``).
* ``kivi4`` / ``kivi2`` (`spectral.py`) - the KIVI reference quantizer of
  ``spectral_kv.compressors.kivi`` on the same tiers (options ``sink``, ``block``, ``hot``).
* ``quanto`` / ``hqq`` (`quantized.py`) - transformers ``QuantizedCache`` (options ``bits``,
  ``group``, ``residual``).
* ``streaming`` / ``snapkv`` / ``knorm`` / ``expected`` (`presses.py`) - kvpress presses applied
  at prefill (option ``ratio``: fraction of the context evicted); ``kvpress:press=snapkv,ratio=0.5``
  is the same spelled generically. kvpress is optional and pins transformers (< 5.3 for 0.5.x):
  with it missing or incompatible these methods raise ``ImportError`` naming the conflict.
* ``<press>+<spectral>`` (`composed.py`) - eviction first, then spectral compression of what is kept.
"""

from __future__ import annotations

from typing import Callable

from .base import CacheMethod, model_kv_shape, parse_spec, positions
from .composed import ComposedMethod, compose
from .exact import build_exact
from .presses import PRESSES, build_press
from .quantized import build_quantized
from .spectral import build_kivi, build_spectral

__all__ = [
    "CacheMethod", "ComposedMethod", "parse_spec", "positions", "make_method", "model_kv_shape",
    "DEFAULT_METHODS", "QUICK_METHODS", "BUILDERS",
]

DEFAULT_METHODS = [
    "exact",
    "spectral:preset=original",
    "spectral",
    "kivi4",
    "kivi2",
    "quanto:bits=4",
    "quanto:bits=2",
    "hqq:bits=4",
    "hqq:bits=2",
    "streaming:ratio=0.75",
    "snapkv:ratio=0.75",
    "knorm:ratio=0.75",
]
QUICK_METHODS = ["exact", "spectral", "kivi4"]

# family name -> builder(spec, name, opts): pops the options it understands from ``opts``
BUILDERS: dict[str, Callable[[str, str, dict[str, str]], CacheMethod]] = {
    "exact": build_exact,
    "spectral": build_spectral,
    "kivi4": build_kivi,
    "kivi2": build_kivi,
    "quanto": build_quantized,
    "hqq": build_quantized,
    "kvpress": build_press,
    **{name: build_press for name in PRESSES},
}


def make_method(spec: str) -> CacheMethod:
    """Build a :class:`CacheMethod` from a spec string (see the module docstring).

    Raises
    ------
    ValueError
        Unknown name or option, or a composition that is not one press + one spectral method.
    ImportError
        The backend's optional package is missing (quanto, hqq, kvpress).
    """
    if "+" in spec:
        return compose(spec, [make_method(part.strip()) for part in spec.split("+")])
    name, opts = parse_spec(spec)
    if name not in BUILDERS:
        raise ValueError(f"unknown cache method {name!r} in {spec!r}")
    method = BUILDERS[name](spec, name, opts)
    if opts:
        raise ValueError(f"unknown option(s) {sorted(opts)} for method {spec!r}")
    return method
