"""Named cache methods the harness compares, each built from a spec string.

A spec is ``name`` or ``name:key=value,key=value``; for example ``exact``,
``spectral:sink=0`` (the original design), ``kivi2``, ``quanto:bits=4``,
``snapkv:ratio=0.75``.  Families:

* ``exact`` - transformers ``DynamicCache``.
* ``spectral`` - this library: ``preset=`` (``original``, ``fast``, ``balanced``,
  ``max-compression``; default: the library default `SpectralConfig()`) then options ``k``,
  ``v``, ``sink``, ``bits``, ``vbits``, ``group``, ``block``, ``hot``, ``compressor``.
  ``spectral:preset=original`` is the original design (``spectral:sink=0`` before the presets).
* ``kivi4`` / ``kivi2`` - the KIVI reference quantizer of ``spectral_kv.compressors.kivi``
  on the same tiers (options ``sink``, ``block``, ``hot``).
* ``quanto`` / ``hqq`` - transformers ``QuantizedCache`` (options ``bits``, ``group``,
  ``residual``).
* ``streaming`` / ``snapkv`` / ``knorm`` - kvpress presses applied at prefill (option ``ratio``:
  fraction of the context evicted); ``kvpress:press=snapkv,ratio=0.5`` is the same spelled
  generically.  kvpress is optional and pins transformers (< 5.3 for 0.5.x): with it missing or
  incompatible these methods raise ``ImportError`` naming the conflict and the rest still run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CacheMethod", "parse_spec", "positions", "make_method", "DEFAULT_METHODS", "QUICK_METHODS", "model_kv_shape"]

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


def model_kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder-only transformers model."""
    c = model.config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_key_value_heads, head_dim


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:a=1,b=2"`` -> ``("name", {"a": "1", "b": "2"})``."""
    name, _, rest = spec.partition(":")
    opts: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad option {item!r} in method spec {spec!r} (want key=value)")
        opts[key.strip()] = value.strip()
    return name.strip(), opts


@dataclass
class CacheMethod:
    """One cache method: how to build its cache and what it holds.

    Attributes
    ----------
    spec : str
        The spec string it was built from (its label in results).
    family : str
    settings : dict
        Resolved settings (recorded in the results JSON).
    evicts : bool
        Drops tokens (kvpress). The cache then holds fewer entries than the sequence has
        positions, so forwards pass ``cache_position`` = the cache's own length (what
        transformers builds the causal mask from) and ``position_ids`` = the true positions
        (RoPE); see :func:`positions`.
    """

    spec: str
    family: str
    settings: dict[str, Any] = field(default_factory=dict)
    evicts: bool = False
    _handle: Any = None

    # ------------------------------------------------------------------ lifecycle
    def setup(self, model) -> None:
        """Patch ``model`` if the method needs it (the spectral tiers)."""
        if self.family in ("spectral", "kivi"):
            from spectral_kv import patch_unsloth_attention

            self._handle = patch_unsloth_attention(model, config=self.settings["_config"], verbose=False)

    def teardown(self, model) -> None:
        """Undo :meth:`setup`."""
        if self._handle is not None:
            self._handle.unpatch()
            self._handle = None

    def new_cache(self, model):
        """A fresh, empty cache for one sequence."""
        from transformers import DynamicCache, QuantizedCache

        if self._handle is not None:
            return self._handle.new_cache()
        if self.family in ("quanto", "hqq"):
            s = self.settings
            return QuantizedCache(
                backend=self.family,
                config=model.config,
                nbits=s["bits"],
                axis_key=s["axis_key"],
                axis_value=s["axis_value"],
                q_group_size=s["group"],
                residual_length=s["residual"],
            )
        return DynamicCache(config=model.config)

    def prefill_context(self, model):
        """Context manager active during the prefill (a kvpress press, else nothing)."""
        if self.family == "kvpress":
            return self.settings["_press"](model)
        return contextlib.nullcontext()

    @property
    def can_seed(self) -> bool:
        """Its prefill attends exactly, so its cache can be built from the exact prefill's K/V
        (:meth:`seed_cache`): true for every method except eviction, whose press reads the
        prefill's hidden states."""
        return not self.evicts

    def seed_cache(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]]):
        """A fresh cache of this method holding ``kv`` (per layer ``[B, H, T, D]`` keys, values).

        Equal to prefilling the same tokens through the method: the spectral tiers attend the
        prompt exactly and then append it (``tiers.append``, done here directly), and
        ``QuantizedCache`` quantizes the prompt it was given at its first update.
        """
        if not self.can_seed:
            raise ValueError(f"method {self.spec!r} evicts at prefill; its cache cannot be seeded from K/V")
        cache = self.new_cache(model)
        for i, (k, v) in enumerate(kv):
            layer = cache.layers[i]
            if hasattr(layer, "tiers"):
                layer.lazy_initialization(k, v)
                layer.tiers.append(k, v)
            else:
                cache.update(k, v, i)
        return cache

    # ------------------------------------------------------------------ inspection
    def dense_kv(self, cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values attention would read for this layer, ``[B, H, T, D]`` each.

        ``None`` for eviction methods (positions are gone; fidelity is not defined the same way).
        """
        layer = cache.layers[layer_idx]
        if self.evicts:
            return None
        if hasattr(layer, "tiers"):
            k, v, _ = layer.tiers.materialize()
            return k, v
        if hasattr(layer, "_quantized_keys"):
            k = layer._dequantize(layer._quantized_keys)
            v = layer._dequantize(layer._quantized_values)
            if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2]:
                k, v = torch.cat([k, layer.keys], -2), torch.cat([v, layer.values], -2)
            return k, v
        return layer.keys, layer.values

    def describe(self) -> dict[str, Any]:
        """JSON-able description."""
        return {
            "spec": self.spec,
            "family": self.family,
            "settings": {k: v for k, v in self.settings.items() if not k.startswith("_")},
            "evicts": self.evicts,
        }


_PRESSES = {"streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress"}


# spec option -> SpectralConfig field
_SPECTRAL_OPTIONS = {
    "k": "k_rank_keys", "v": "k_rank_values", "sink": "sink_tokens", "bits": "coeff_bits",
    "vbits": "value_bits", "group": "quant_group", "block": "block_size", "hot": "hot_buffer_size",
    "compressor": "compressor",
}


def _option_value(field: str, text: str):
    if field == "compressor":
        return text
    if text.lower() == "none":
        return None
    if field == "value_bits" and text == "same":
        return text
    return int(text)


def _spectral_settings(opts: dict[str, str], base_fields: dict[str, Any], spectral_attention: bool) -> dict[str, Any]:
    """Resolved settings of a spectral-tier method: ``preset=`` (default: the library default
    `SpectralConfig()`), then ``base_fields``, then the spec's options (``_SPECTRAL_OPTIONS``)."""
    from dataclasses import asdict

    from spectral_kv import SpectralConfig

    preset = opts.pop("preset", None)
    config = SpectralConfig.preset(preset) if preset else SpectralConfig()
    changes = dict(base_fields)
    for key, field_name in _SPECTRAL_OPTIONS.items():
        if key in opts:
            text = opts.pop(key)
            try:
                changes[field_name] = _option_value(field_name, text)
            except ValueError:
                raise ValueError(f"option {key}={text!r}: want an integer or 'none'") from None
    config = config.replace(**changes, use_spectral_attention=spectral_attention, verbose=False)
    fields = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {"preset": preset or "default", **fields, "_config": config}


def positions(cache, true_pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cache_position, position_ids)`` for feeding ``n`` tokens at sequence position ``true_pos``.

    transformers builds the causal mask (and kvpress its prefill check) from ``cache_position``
    against the cache's length; RoPE uses ``position_ids``.  For caches that keep every token
    both equal ``true_pos + arange(n)``; after eviction the cache is shorter, and a chunk with
    ``cache_position`` = true positions would see its own future.
    """
    held = int(cache.get_seq_length())
    return torch.arange(held, held + n), torch.arange(true_pos, true_pos + n)[None]


KVPRESS_TRANSFORMERS = "transformers<5.3 (kvpress 0.5.x)"


def _check_kvpress_compat() -> None:
    """Raise ImportError naming the conflict if kvpress is missing or pins another transformers."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        kv_version = md.version("kvpress")
    except md.PackageNotFoundError:
        raise ImportError(
            f"kvpress methods need the 'kvpress' package, not installed (it needs {KVPRESS_TRANSFORMERS}; "
            "install it in an environment with such a transformers)"
        ) from None
    tf_version = md.version("transformers")
    for text in md.requires("kvpress") or []:
        req = Requirement(text)
        if req.name == "transformers" and not req.marker and Version(tf_version) not in req.specifier:
            raise ImportError(
                f"kvpress {kv_version} requires transformers{req.specifier}, found transformers {tf_version}: "
                "run kvpress methods in an environment with a matching transformers (e.g. 5.2.x)"
            )


def _import_kvpress():
    """Import kvpress without keeping its global wrap of *our* attention functions.

    kvpress wraps every registered attention function and calls it as
    ``func(module, q, k, v, mask, dropout, **kwargs)``; the "spectral_kv" function takes
    ``scaling`` as its sixth parameter, so the wrap breaks it.  The presses used here do
    not need the wrap (it serves head-wise eviction such as AdaKV), so the non-transformers
    entries are restored.
    """
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "kvpress" not in sys.modules:
        _check_kvpress_compat()
        before = dict(ALL_ATTENTION_FUNCTIONS.items())
        try:
            import kvpress  # noqa: F401
        except Exception as e:  # a half-compatible install fails inside transformers' internals
            import transformers

            raise ImportError(
                f"importing kvpress failed with transformers {transformers.__version__} "
                f"({type(e).__name__}: {e}); kvpress 0.5.x needs {KVPRESS_TRANSFORMERS}"
            ) from e

        for name, func in before.items():
            if getattr(func, "__module__", "").startswith(("spectral_kv",)):
                ALL_ATTENTION_FUNCTIONS[name] = func
    return sys.modules["kvpress"]


def make_method(spec: str) -> CacheMethod:
    """Build a :class:`CacheMethod` from a spec string (see the module docstring).

    Raises
    ------
    ValueError
        Unknown name or option.
    ImportError
        The backend's optional package is missing (quanto, hqq, kvpress).
    """
    name, opts = parse_spec(spec)
    if name == "exact":
        method = CacheMethod(spec, "exact", {"cache": "DynamicCache"})
    elif name == "spectral":
        s = _spectral_settings(opts, {}, True)
        method = CacheMethod(spec, "spectral", s)
    elif name in ("kivi4", "kivi2"):
        import spectral_kv.compressors.kivi  # noqa: F401  (registers kivi4 / kivi2)

        # The rank is not used by KIVI; a small even value passes the config's checks.
        s = _spectral_settings(opts, dict(compressor=name, value_compressor=None, k_rank_keys=2, k_rank_values=2), False)
        method = CacheMethod(spec, "kivi", s)
    elif name in ("quanto", "hqq"):
        import importlib.util

        module = "optimum.quanto" if name == "quanto" else "hqq"
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise ImportError(f"method {spec!r} needs the '{'optimum-quanto' if name == 'quanto' else 'hqq'}' package")
        s = {
            "bits": int(opts.pop("bits", 4)),
            "group": int(opts.pop("group", 64)),
            "residual": int(opts.pop("residual", 128)),
            "axis_key": int(opts.pop("axis_key", 0)),
            "axis_value": int(opts.pop("axis_value", 0)),
        }
        method = CacheMethod(spec, name, s)
    elif name in _PRESSES or name == "kvpress":
        if name == "kvpress":
            name = opts.pop("press", "")
            if name not in _PRESSES:
                raise ValueError(f"kvpress method {spec!r}: press={name!r}, want one of {sorted(_PRESSES)}")
        kvpress = _import_kvpress()

        ratio = float(opts.pop("ratio", 0.75))
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"kvpress method {spec!r}: ratio={ratio} must be in [0, 1) (fraction evicted)")
        press = getattr(kvpress, _PRESSES[name])(compression_ratio=ratio)
        method = CacheMethod(spec, "kvpress", {"press": _PRESSES[name], "ratio": ratio, "_press": press}, evicts=True)
    else:
        raise ValueError(f"unknown cache method {name!r} in {spec!r}")
    if opts:
        raise ValueError(f"unknown option(s) {sorted(opts)} for method {spec!r}")
    return method
