"""``quanto`` / ``hqq``: transformers' ``QuantizedCache`` (options ``bits``, ``group``, ``residual``,
``axis_key``, ``axis_value``)."""

from __future__ import annotations

import importlib.util

import torch

from .base import CacheMethod

__all__ = ["QuantizedMethod", "build_quantized"]


class QuantizedMethod(CacheMethod):
    """transformers ``QuantizedCache`` with the ``quanto`` or ``hqq`` backend."""

    def new_cache(self, model):
        from transformers import QuantizedCache

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


    def dense_kv(self, cache, layer_idx: int):
        # QuantizedLayer internals (transformers 5.x): quantized history + a residual of
        # full-precision tokens in ``keys`` / ``values``.
        layer = cache.layers[layer_idx]
        k = layer._dequantize(layer._quantized_keys)
        v = layer._dequantize(layer._quantized_values)
        if layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2]:
            k, v = torch.cat([k, layer.keys], -2), torch.cat([v, layer.values], -2)
        return k, v


def build_quantized(spec: str, name: str, opts: dict[str, str]) -> QuantizedMethod:
    module = "optimum.quanto" if name == "quanto" else "hqq"
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        raise ImportError(f"method {spec!r} needs the '{'optimum-quanto' if name == 'quanto' else 'hqq'}' package")
    settings = {
        "bits": int(opts.pop("bits", 4)),
        "group": int(opts.pop("group", 64)),
        "residual": int(opts.pop("residual", 128)),
        "axis_key": int(opts.pop("axis_key", 0)),
        "axis_value": int(opts.pop("axis_value", 0)),
    }
    return QuantizedMethod(spec, name, settings)
