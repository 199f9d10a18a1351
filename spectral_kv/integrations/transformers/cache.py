"""`SpectralCache` and `SpectralLayer`: the transformers `Cache` over the compressed tiers.

A forward pass reaches the tiers in three calls (see `.attention` for the hand-off):

    SpectralLayer.update(k, v)                 # stages the new tokens, leaves the hand-off
    SpectralLayer.attend_and_commit(q, k, v, mask, scaling)
        view = tiers.view(k, v, mask)          # AttendView: tiers + staged tokens, masks or counts
        out  = strategy.attend(q, view, scaling)
        tiers.commit()                         # staged tokens -> hot/warm; full warm -> cold

So the prompt itself is attended exactly, and compression affects what comes after it. If the
model runs another attention implementation (sdpa, eager...), the layer commits at once and
returns the cold blocks decompressed: correct with any attention, memory saved at rest, no
compute saved.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from ...attention.compiled import compile_attend
from ...attention.fused import default_decode_attention
from ...config import SpectralConfig
from ...graphs import advance_deferred
from ...registry import ATTENTION_STRATEGIES
from ...tiers import TierManager, crop_length
from .attention import ATTENTION_NAME, hand_off
from .layer_access import finish_writes, read_role, write_role
from .model_config import head_dim, kv_heads, text_config
from .persist import load_cache, model_identity, save_cache
from .tensor_parallel import local_split

__all__ = ["SpectralCache", "SpectralLayer", "CROP_ZERO_REMOVES_NOTHING"]

# transformers changed what a layer's ``crop(n)`` argument means: up to 5.1x it is the length
# to keep (negative: tokens to remove), so ``crop(0)`` empties the cache; later versions name it
# ``tokens_to_remove`` and assisted decoding calls ``crop(-n)`` after every step, ``n`` possibly
# 0, which must remove nothing. Follow whichever the installed DynamicLayer implements.
CROP_ZERO_REMOVES_NOTHING = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters


class SpectralLayer(CacheLayerMixin):
    """One full-attention layer's cache: a `TierManager` plus the attention strategy.

    Parameters
    ----------
    config : SpectralConfig
    layer_idx : int
    text_config : transformers config or None
        Read at every update to learn whether the "spectral_kv" attention will consume the
        staged tokens or another attention needs the materialized K/V.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, config: SpectralConfig, layer_idx: int, text_config=None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.text_config = text_config
        self.tiers = TierManager(config, name=f"layer {layer_idx}")
        comps = (config, self.tiers.key_compressor, self.tiers.value_compressor)
        # attention=None picks per device at the first update (`default_decode_attention`).
        self._set_strategy(config.attention_name)
        # Prompts (q_len > 1) go through SDPA on decompressed blocks: both strategies compute
        # the same function (tested), the cold part is transient there, and SDPA's fused
        # kernels beat a Tq x L float32 score matrix by ~6x on a 3K-token CPU prefill.
        self.prefill_strategy = ATTENTION_STRATEGIES["reconstruct"](*comps)
        self.attention_calls = 0
        self._staged = False

    def _set_strategy(self, name: str) -> None:
        self.strategy = ATTENTION_STRATEGIES[name](self.config, self.tiers.key_compressor, self.tiers.value_compressor)
        # Decode steps only: a prompt is attended once, compiling it would cost more than it saves.
        self.decode_attend = compile_attend(self.strategy) if self.config.compile else self.strategy.attend

    def __repr__(self) -> str:
        return f"SpectralLayer(layer_idx={self.layer_idx}, tokens={self.tiers.tokens()}, cold_blocks={self.tiers.n_cold})"

    # -------------------------------------------------------------- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.text_config is not None:  # a tensor-parallel rank holds an even share of whole KV heads
            local_split(key_states.shape[1], kv_heads(self.text_config), f"SpectralCache layer {self.layer_idx}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        if self.config.attention is None:  # the default: the layout's fused kernel on CUDA
            name = default_decode_attention(self.config, self.tiers.key_compressor, self.tiers.value_compressor,
                                            key_states.device)
            if name != self.strategy.name:
                self._set_strategy(name)

    def _consumer_is_spectral(self) -> bool:
        impl = getattr(self.text_config, "_attn_implementation", ATTENTION_NAME) if self.text_config else ATTENTION_NAME
        return impl == ATTENTION_NAME

    def update(self, key_states, value_states, cache_kwargs: dict[str, Any] | None = None):
        finish_writes(self)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._staged:
            raise RuntimeError(
                f"SpectralCache layer {self.layer_idx}: the previous update was never consumed by the "
                f"'{ATTENTION_NAME}' attention function, so its tokens would be lost. Load the model with "
                f"attn_implementation='{ATTENTION_NAME}' or call spectral_kv.patch_unsloth_attention(model)."
            )
        if self._consumer_is_spectral():
            self._staged = True
            hand_off(self, key_states)
            return key_states, value_states
        self.tiers.append(key_states, value_states)
        keys, values, _ = self.tiers.materialize()  # no padding info here: all rows are full
        return keys, values

    def get_mask_sizes(self, query: torch.Tensor | int) -> tuple[int, int]:
        # transformers <= 5.1x passes cache_position (a tensor), 5.17 the query length (an int).
        q_len = query if isinstance(query, int) else query.shape[0]
        return self.tiers.seen + q_len, 0

    def get_seq_length(self) -> int:
        return self.tiers.seen

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:  # abstract from transformers 5.17 on
        return -1

    def reset(self) -> None:
        self.tiers.reset()
        self._staged = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.tiers.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(1)
        self.tiers.select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        b = self.tiers.batch_size
        self.tiers.select_rows(torch.arange(b).repeat_interleave(repeats))

    def crop(self, max_length: int) -> None:
        """Exact when only tokens of the exact tiers are removed (see `TierManager.crop`), else
        `NotImplementedError` naming the boundary."""
        max_length = crop_length(max_length, self.tiers.name)
        if max_length == 0 and CROP_ZERO_REMOVES_NOTHING:
            return
        try:
            self.tiers.crop(max_length)
        except NotImplementedError as exc:
            raise NotImplementedError(f"SpectralCache.crop: {exc}") from None

    def offload(self):
        raise NotImplementedError("SpectralCache does not support offloading layers to the CPU")

    prefetch = offload

    # -------------------------------------------------------------- attention
    def attend_and_commit(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
    ) -> torch.Tensor:
        """Attend ``query`` [B, Hq, Tq, D] over the tiers plus the staged tokens, then commit them.

        ``mask`` is transformers' [B, 1, Tq, kv_len] mask (bool or additive) in its (padded)
        positions; the tier manager reads causality and padding among the new tokens from it.
        Returns [B, Hq, Tq, D].

        On static storage a decode step needs no host sync and has fixed addresses, so it can
        be captured in a CUDA graph; under a graph driver (`spectral_kv.graphs.deferred_advance`)
        the host checks and the host side of the step are left to the driver.
        """
        self._staged = False
        if not torch.compiler.is_compiling():  # a guarded count would recompile every step
            self.attention_calls += 1
        deferred = advance_deferred()
        view = self.tiers.view(key, value, mask, check=not deferred)
        if view.static:  # static decode steps run eagerly (a CUDA graph captures them instead)
            out = self.strategy.attend(query, view, scaling)
        elif query.shape[2] == 1:
            out = self.decode_attend(query, view, scaling)
        else:
            out = self.prefill_strategy.attend(query, view, scaling)
        self.tiers.commit(advance=not deferred)
        return out

    def memory_report(self) -> dict[str, int]:
        return self.tiers.memory_report()

    # -------------------------------------------------------------- keys / values (DynamicLayer's attributes)
    @property
    def keys(self) -> torch.Tensor | None:
        """Keys ``[B, H, L, D]`` in the model's dtype as attention sees them, ``None`` while empty;
        assignable as on a `DynamicLayer` (see `.layer_access`)."""
        return read_role(self, "keys")

    @keys.setter
    def keys(self, new: torch.Tensor | None) -> None:
        write_role(self, "keys", new)

    @property
    def values(self) -> torch.Tensor | None:
        """Values ``[B, H, L, D]``; see `keys`."""
        return read_role(self, "values")

    @values.setter
    def values(self, new: torch.Tensor | None) -> None:
        write_role(self, "values", new)


def _exact_layer_report(layer) -> dict[str, int]:
    held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return {"exact_layer": held, "total_bytes": held, "dense_bytes": held, "tokens": 0}


class SpectralCache(Cache):
    """A transformers `Cache` whose full-attention layers keep old tokens as spectral blocks.

    Parameters
    ----------
    config : SpectralConfig, optional
        Defaults to ``SpectralConfig()``; keyword ``overrides`` are applied on top. Layer ``i``
        runs ``config.layer_config(i)`` (its `layer_overrides` entry, if any).
    model_config : transformers config, optional
        The model's config. With it, sliding-window / chunked layers (which the method cannot
        serve) get transformers' own exact layers, with a one-line notice, and head_dim is
        validated at once; without it, every layer is spectral and created lazily.

    Examples
    --------
    >>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="spectral_kv")
    >>> model.generate(**inputs, past_key_values=SpectralCache(SpectralConfig(), model.config))
    """

    def __init__(self, config: SpectralConfig | None = None, model_config=None, **overrides) -> None:
        config = SpectralConfig.resolve(config, **overrides)
        self.config = config
        self.exact_layer_indices: list[int] = []
        self.model_identity = None if model_config is None else model_identity(model_config)
        if model_config is None:  # layers made lazily: `layer_overrides` indices cannot be checked here
            super().__init__(layer_class_to_replicate=lambda: SpectralLayer(config.layer_config(len(self.layers)), len(self.layers)))
            return
        text = text_config(model_config)
        config.check_head_dim(head_dim(text))
        window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
        layer_types = getattr(text, "layer_types", None) or [
            "sliding_attention" if window is not None else "full_attention"
        ] * text.num_hidden_layers
        if getattr(text, "num_kv_shared_layers", None):
            layer_types = layer_types[: -text.num_kv_shared_layers]
        named = config.overridden_layers()
        if named and named[-1] >= len(layer_types):
            raise ValueError(f"layer_overrides names layer {named[-1]}, the model's cache has {len(layer_types)} layers")
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types):
            if kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
                self.exact_layer_indices.append(i)
            elif kind == "full_attention":
                layers.append(SpectralLayer(config.layer_config(i), i, text))
            else:
                layers.append(DynamicLayer())
                self.exact_layer_indices.append(i)
        if set(named) & set(self.exact_layer_indices):  # an override there would silently do nothing
            raise ValueError(f"layer_overrides names layers {sorted(set(named) & set(self.exact_layer_indices))}, "
                             "which this model keeps exact (sliding-window or not full attention)")
        if self.exact_layer_indices and config.verbose:
            print(
                f"spectral_kv: {len(self.exact_layer_indices)}/{len(layer_types)} layers are sliding-window or "
                f"not full attention and stay exact: {self.exact_layer_indices}"
            )
        super().__init__(layers=layers)

    @property
    def spectral_layers(self) -> list[SpectralLayer]:
        return [layer for layer in self.layers if isinstance(layer, SpectralLayer)]

    def memory_report(self) -> dict[str, Any]:
        """Bytes held per tier summed over layers, from the tensors themselves.

        Returns a dict with the `TierManager.memory_report` keys summed, ``exact_layers``
        (bytes of layers kept exact), ``ratio`` (``dense_bytes / total_bytes``) and
        ``per_layer`` (the per-layer reports).
        """
        per_layer = [
            layer.memory_report() if isinstance(layer, SpectralLayer) else _exact_layer_report(layer)
            for layer in self.layers
        ]
        total: dict[str, Any] = {}
        for rep in per_layer:
            for key, value in rep.items():
                total[key] = total.get(key, 0) + value
        total["ratio"] = total.get("dense_bytes", 0) / total["total_bytes"] if total.get("total_bytes") else 1.0
        total["per_layer"] = per_layer
        return total

    def save(self, path) -> str:
        """Write every tier of every layer to a safetensors file (see `spectral_kv.integrations.transformers.persist`);
        returns the file's sha256."""
        return save_cache(self, path)

    @classmethod
    def load(cls, path, model_or_config, *, config: SpectralConfig | None = None, device=None) -> "SpectralCache":
        """Read a cache written by `save`, validated against ``model_or_config`` (and ``config``
        when given); a `ValueError` names whatever mismatched."""
        return load_cache(path, model_or_config, config=config, device=device,
                          make_cache=lambda cfg, model_config: cls(cfg.replace(verbose=False), model_config))

    # -------------------------------------------------------------- static storage
    def freeze(self, new_tokens: int) -> None:
        """Switch every layer to static storage with room for ``new_tokens`` more decode tokens.

        Decode steps then write into preallocated buffers and read device-side counts, so a
        step can be captured in a CUDA graph (`spectral_kv.graphs.StaticDecoder`); blocks are
        compressed between steps (in the background with ``compress_lag > 0``). Call it after
        the prompt. Layers kept exact (sliding window) grow by concatenation and cannot be
        frozen: a `ValueError` names them.
        """
        if self.exact_layer_indices:
            raise ValueError(
                f"SpectralCache.freeze: layers {self.exact_layer_indices} are kept exact (sliding-window or not "
                f"full attention) and grow by concatenation; static storage needs every layer compressed"
            )
        for layer in self.spectral_layers:
            layer.tiers.freeze(new_tokens)

    def thaw(self) -> None:
        """Back to the dynamic layout (any operation other than a decode step does this itself)."""
        for layer in self.spectral_layers:
            layer.tiers.thaw()

    def advance(self) -> None:
        """The host side of a static decode step whose `advance` was deferred (graph replay)."""
        for layer in self.spectral_layers:
            layer.tiers.advance()

    def drain(self) -> None:
        """Wait for blocks compressed in the background and swap them in."""
        for layer in self.spectral_layers:
            layer.tiers.drain()

    @property
    def storage_version(self) -> tuple[int, ...]:
        """Changes whenever a layer's buffers move (a CUDA graph over them must be re-captured)."""
        return tuple(layer.tiers.version for layer in self.spectral_layers)

    def attention_calls(self) -> int:
        """Times the spectral attention ran over this cache's layers."""
        return sum(layer.attention_calls for layer in self.spectral_layers)
