"""Hugging Face transformers integration: `SpectralCache`, the "spectral_kv" attention and mask
functions, and `patch_model`. The only module of the library that imports transformers.

How a forward pass reaches the compressed tiers
-----------------------------------------------
transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function, which
receives the attention module but not the cache. ``SpectralLayer.update`` therefore *stages*
the new keys/values and leaves a hand-off (this thread's layer + the exact key tensor it
returned); the "spectral_kv" attention function claims it only when handed that very tensor
(an identity check, so nothing else can be mistaken for it), attends over the cold blocks,
the exact tiers and the new tokens, and only then commits the new tokens to the tiers. So the
prompt itself is attended exactly, and compression affects what comes after it.

If the model runs another attention implementation (sdpa, eager...), the layer commits at
once and returns the cold blocks decompressed: correct with any attention, memory saved at
rest, no compute saved.

The registered mask function is transformers' ``sdpa_mask`` with the causal shortcut turned
off, so the attention function always gets a boolean ``[B, 1, Tq, kv_len]`` mask. Without a
registered mask function transformers silently passes *no* causal mask to a custom attention.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..attention import ATTENTION_STRATEGIES
from ..attention.compiled import compile_attend
from ..config import SpectralConfig
from ..persist import load_cache, model_identity, save_cache
from ..static import advance_deferred
from ..tiers import TierManager, crop_length

__all__ = [
    "ATTENTION_NAME",
    "SpectralCache",
    "SpectralLayer",
    "SpectralPatch",
    "patch_model",
    "spectral_attention_forward",
    "spectral_mask",
    "COUNTERS",
    "check_generate_limits",
]

ATTENTION_NAME = "spectral_kv"
# transformers changed what a layer's ``crop(n)`` argument means: up to 5.1x it is the length
# to keep (negative: tokens to remove), so ``crop(0)`` empties the cache; later versions name it
# ``tokens_to_remove`` and assisted decoding calls ``crop(-n)`` after every step, ``n`` possibly
# 0, which must remove nothing. Follow whichever the installed DynamicLayer implements.
CROP_ZERO_REMOVES_NOTHING = "tokens_to_remove" in inspect.signature(DynamicLayer.crop).parameters
MIN_TRANSFORMERS = Version("5.2.0")
if Version(transformers.__version__) < MIN_TRANSFORMERS:
    raise ImportError(
        f"spectral_kv needs transformers>={MIN_TRANSFORMERS} (tested 5.2 to 5.17), found {transformers.__version__}"
    )

# Process-wide call counters: tests and `verbose` use them to prove attention really ran here.
COUNTERS = {"spectral_calls": 0, "exact_calls": 0, "mask_calls": 0}
_handoff = threading.local()


def _text_config(model_config):
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


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
        self.strategy = ATTENTION_STRATEGIES[config.attention_name](*comps)
        # Prompts (q_len > 1) go through SDPA on decompressed blocks: both strategies compute
        # the same function (tested), the cold part is transient there, and SDPA's fused
        # kernels beat a Tq x L float32 score matrix by ~6x on a 3K-token CPU prefill.
        self.prefill_strategy = ATTENTION_STRATEGIES["reconstruct"](*comps)
        # Decode steps only: a prompt is attended once, compiling it would cost more than it saves.
        self.decode_attend = compile_attend(self.strategy) if config.compile else self.strategy.attend
        self.attention_calls = 0
        self._staged = False

    def __repr__(self) -> str:
        return f"SpectralLayer(layer_idx={self.layer_idx}, tokens={self.tiers.tokens()}, cold_blocks={self.tiers.n_cold})"

    # -------------------------------------------------------------- CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _consumer_is_spectral(self) -> bool:
        impl = getattr(self.text_config, "_attn_implementation", ATTENTION_NAME) if self.text_config else ATTENTION_NAME
        return impl == ATTENTION_NAME

    def update(self, key_states, value_states, cache_kwargs: dict[str, Any] | None = None):
        self._finish_writes()
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
            _handoff.layer, _handoff.key = self, key_states
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

        ``mask`` is transformers' [B, 1, Tq, kv_len] mask in its (padded) positions; its last
        ``Tq`` columns give causality and padding among the new tokens, and its last row which
        new tokens are real (left or right padding alike: the last query sees every real key).
        Returns [B, Hq, Tq, D].
        """
        self._staged = False
        self.attention_calls += 1
        b, _, tq, _ = query.shape
        if mask is not None and mask.dtype != torch.bool:  # an additive float mask: 0 = attend
            mask = mask > torch.finfo(mask.dtype).min / 2
        if self.tiers.static and tq == 1:
            return self._static_decode(query, key, value, mask, scaling)
        if mask is not None:
            if mask.shape[-1] != self.tiers.seen + tq:
                raise ValueError(
                    f"SpectralCache layer {self.layer_idx}: attention mask covers {mask.shape[-1]} positions, "
                    f"the cache expects {self.tiers.seen + tq}"
                )
            # A decode query is the newest token and always sees itself, so it needs no chunk
            # mask; leaving it None keeps exact_mask None in unpadded batches, which lets the
            # fused kernel run without a host-side mask check (a sync and a graph break).
            chunk_mask = mask[:, :1, :, -tq:].expand(b, 1, tq, tq) if tq > 1 else None
            valid_new = mask[:, 0, -1, -tq:].expand(b, tq)
        else:
            chunk_mask = None
            if tq > 1:
                chunk_mask = torch.ones(tq, tq, dtype=torch.bool, device=query.device).tril()[None, None].expand(b, 1, tq, tq)
            valid_new = None
        cold_k = cold_v = {}
        cold_valid = None
        exact_k, exact_v, exact_mask = key, value, chunk_mask
        if self.tiers.initialized:
            view = self.tiers.view()
            cold_k, cold_v, cold_valid = view.cold_k, view.cold_v, view.cold_valid
            width = view.exact_k.shape[2]
            if width:
                exact_k = torch.cat((view.exact_k, key), dim=2)
                exact_v = torch.cat((view.exact_v, value), dim=2)
                if view.exact_valid is not None or chunk_mask is not None:
                    past = view.exact_valid
                    past = (
                        torch.ones(b, 1, tq, width, dtype=torch.bool, device=query.device)
                        if past is None
                        else past[:, None, None, :].expand(b, 1, tq, width)
                    )
                    new = chunk_mask if chunk_mask is not None else torch.ones(b, 1, tq, tq, dtype=torch.bool, device=query.device)
                    exact_mask = torch.cat((past, new), dim=-1)
        attend = self.decode_attend if tq == 1 else self.prefill_strategy.attend
        out = attend(query, cold_k, cold_v, cold_valid, exact_k, exact_v, exact_mask, scaling)
        self.tiers.append(key, value, None if valid_new is None or bool(valid_new.all()) else valid_new.contiguous())
        return out

    def _static_decode(self, query, key, value, mask, scaling) -> torch.Tensor:
        """One decode step on static storage (`spectral_kv.static`): no host sync and fixed
        addresses, so it can be captured in a CUDA graph. Attention needs no mask: padding was
        dropped when the prompt was stored, and a decode token is a real token seeing every
        held one. Checks that need the host (finite values, the mask saying the new token is
        real) run only when `advance` is not deferred (eager steps); a graph driver checks the
        logits instead, and a block holding NaN/Inf is refused before it is swapped in."""
        t = self.tiers
        deferred = advance_deferred()
        if not deferred:
            t._check(key, value, None)
            if mask is not None and not bool(mask[:, 0, -1, -1].all()):
                raise ValueError(
                    f"SpectralCache layer {self.layer_idx}: a frozen (static) cache takes decode tokens that are "
                    f"real tokens; the attention mask marks the new token of some row as padding"
                )
        t.append_static(key, value)
        out = self.strategy.attend_counts(
            query, t.cold_k.parts, t.cold_v.parts, t.n_cold_t, t.exact_k, t.exact_v, t.n_exact_t, scaling
        )
        if not deferred:
            t.advance()
        return out

    def memory_report(self) -> dict[str, int]:
        return self.tiers.memory_report()

    # -------------------------------------------------------------- keys / values (DynamicCache's attributes)
    # Clients written against DynamicCache (kvpress, user code) read and assign ``layer.keys`` /
    # ``layer.values``. Reading gives the K/V attention sees; assigning is interpreted as what it
    # would mean for a DynamicLayer: the same contents (no-op), a prefix (the newest tokens
    # removed: `TierManager.truncate`, which attention cannot tell from the state before), or
    # new contents (`TierManager.replace`, before compression only). Clients assign one role,
    # then the other: a write whose length differs from the other role's waits for it
    # (`_pending`), and an update with a write still waiting is refused rather than silently
    # mixing old and new contents.
    @property
    def keys(self) -> torch.Tensor | None:
        """Keys ``[B, H, L, D]`` in the model's dtype as attention sees them, ``None`` while empty.

        With cold blocks this is a full-precision copy (decompressed on each read,
        `TierManager.dense`), so it costs what a `DynamicCache` of the same length holds."""
        return self._read("keys")

    @keys.setter
    def keys(self, new: torch.Tensor | None) -> None:
        self._write("keys", new)

    @property
    def values(self) -> torch.Tensor | None:
        """Values ``[B, H, L, D]``; see `keys`."""
        return self._read("values")

    @values.setter
    def values(self, new: torch.Tensor | None) -> None:
        self._write("values", new)

    def _read(self, role: str) -> torch.Tensor | None:
        pending = self.__dict__.get("_pending") or {}
        if role in pending:
            return pending[role]
        tiers = self.__dict__.get("tiers")  # CacheLayerMixin.__init__ runs before the tiers exist
        if tiers is None or not tiers.initialized:
            return None
        return tiers.dense()[0 if role == "keys" else 1]

    def _write(self, role: str, new: torch.Tensor | None) -> None:
        if new is None:  # CacheLayerMixin.__init__ assigns None; so may a client emptying a layer
            tiers = self.__dict__.get("tiers")
            if tiers is not None and tiers.initialized and tiers.seen:
                raise ValueError(
                    f"SpectralCache layer {self.layer_idx}: assigning layer.{role} = None would drop "
                    f"{self.tiers.seen} positions; use cache.reset() or crop()"
                )
            return
        if not isinstance(new, torch.Tensor) or new.dim() != 4:
            raise ValueError(
                f"SpectralCache layer {self.layer_idx}: layer.{role} must be a [batch, kv_heads, tokens, head_dim] "
                f"tensor, got {type(new).__name__} {tuple(getattr(new, 'shape', ()))}"
            )
        pending = self.__dict__.setdefault("_pending", {})
        pending[role] = new
        other = "values" if role == "keys" else "keys"
        if other not in pending:
            current = self._read(other)
            if current is None or current.shape != new.shape:
                return  # wait for the other role
            pending[other] = current
        keys, values = pending.pop("keys"), pending.pop("values")
        self._assign(keys, values)

    def _assign(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.shape != values.shape:
            raise ValueError(
                f"SpectralCache layer {self.layer_idx}: assigned keys {tuple(keys.shape)} and values "
                f"{tuple(values.shape)} differ in shape"
            )
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        t = self.tiers
        if t.initialized:
            cur_k, cur_v = t.dense()
            n = keys.shape[2]
            if keys.shape[:2] == cur_k.shape[:2] and n <= cur_k.shape[2] and keys.shape[3] == cur_k.shape[3]:
                if torch.equal(keys, cur_k[:, :, :n]) and torch.equal(values, cur_v[:, :, :n]):
                    if n < cur_k.shape[2]:  # the newest tokens removed (kvpress, after an answer)
                        t.truncate(n, keys, values)
                    return
        t.replace(keys.to(self.dtype), values.to(self.dtype))

    def _finish_writes(self) -> None:
        """Called by `update`: a write of one role never matched by the other is an error."""
        pending = self.__dict__.get("_pending")
        if pending:
            role = next(iter(pending))
            raise ValueError(
                f"SpectralCache layer {self.layer_idx}: layer.{role} was assigned {tuple(pending[role].shape)}, "
                f"which does not match the layer's other role; assign keys and values of the same shape"
            )

    def _defer_if_hooked(self, module: torch.nn.Module, query: torch.Tensor) -> None:
        """Called by the attention function: a prompt attended by a module with forward hooks
        (where kvpress presses read and rewrite ``keys`` / ``values``) is compressed at the
        layer's next update instead of now (`TierManager.defer_next_compression`)."""
        self.tiers.defer_next_compression = query.shape[2] > 1 and bool(module._forward_hooks)


def _exact_layer_report(layer) -> dict[str, int]:
    held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))
    return {"exact_layer": held, "total_bytes": held, "dense_bytes": held, "tokens": 0}


class SpectralCache(Cache):
    """A transformers `Cache` whose full-attention layers keep old tokens as spectral blocks.

    Parameters
    ----------
    config : SpectralConfig, optional
        Defaults to ``SpectralConfig()``; keyword ``overrides`` are applied on top.
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
        config = config or SpectralConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.exact_layer_indices: list[int] = []
        self.model_identity = None if model_config is None else model_identity(model_config)
        if model_config is None:
            super().__init__(layer_class_to_replicate=lambda: SpectralLayer(config, len(self.layers)))
            return
        text = _text_config(model_config)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        config.check_head_dim(head_dim)
        window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
        layer_types = getattr(text, "layer_types", None) or [
            "sliding_attention" if window is not None else "full_attention"
        ] * text.num_hidden_layers
        if getattr(text, "num_kv_shared_layers", None):
            layer_types = layer_types[: -text.num_kv_shared_layers]
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types):
            if kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
                self.exact_layer_indices.append(i)
            elif kind == "full_attention":
                layers.append(SpectralLayer(config, i, text))
            else:
                layers.append(DynamicLayer())
                self.exact_layer_indices.append(i)
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
        """Write every tier of every layer to a safetensors file (see `spectral_kv.persist`);
        returns the file's sha256."""
        return save_cache(self, path)

    @classmethod
    def load(cls, path, model_or_config, *, config: SpectralConfig | None = None, device=None) -> "SpectralCache":
        """Read a cache written by `save`, validated against ``model_or_config`` (and ``config``
        when given); a `ValueError` names whatever mismatched."""
        return load_cache(path, model_or_config, config=config, device=device)

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


def spectral_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The "spectral_kv" attention implementation (transformers' AttentionInterface signature).

    Parameters are in ``sdpa_attention_forward``'s order (wrappers such as kvpress call it
    positionally). query [B, Hq, Tq, D], key/value [B, H, Tk, D] -> ([B, Tq, Hq, D], None). Layers without a
    staged `SpectralLayer` (sliding-window layers, no cache) run transformers' SDPA.
    """
    layer = getattr(_handoff, "layer", None)
    if layer is not None and getattr(_handoff, "key", None) is key:
        _handoff.layer = _handoff.key = None
        if dropout:
            raise ValueError(f"spectral_kv attention is for inference; got dropout={dropout}")
        COUNTERS["spectral_calls"] += 1
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer._defer_if_hooked(module, query)
        out = layer.attend_and_commit(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    COUNTERS["exact_calls"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def spectral_mask(*args, **kwargs):
    """transformers' SDPA mask, always materialized as bool ``[B, 1, Tq, kv_len]`` (never None)."""
    COUNTERS["mask_calls"] += 1
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, spectral_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, spectral_mask)


class SpectralPatch:
    """What `patch_model` returns: makes plain ``model.generate`` use a fresh `SpectralCache`.

    Attributes
    ----------
    config : SpectralConfig
    last_cache : SpectralCache or None
        The cache of the latest ``generate`` (or `new_cache`).
    """

    def __init__(self, model, config: SpectralConfig) -> None:
        self.model = model
        self.config = config
        self.last_cache: SpectralCache | None = None
        self._previous_attn = model.config._attn_implementation
        self._had_instance_generate = "generate" in model.__dict__
        self._previous_generate = model.generate
        self.active = False

    def new_cache(self) -> SpectralCache:
        """A fresh `SpectralCache` for this model (also remembered as `last_cache`)."""
        self.last_cache = SpectralCache(self.config.replace(verbose=False), self.model.config)
        return self.last_cache

    def memory_report(self) -> dict[str, Any]:
        """`SpectralCache.memory_report` of the latest generate's cache."""
        if self.last_cache is None:
            raise RuntimeError("memory_report: no generate has run with this patch yet")
        return self.last_cache.memory_report()

    def unpatch(self) -> None:
        """Restore the model's attention implementation and ``generate``."""
        if not self.active:
            return
        _set_attn(self.model, self._previous_attn)
        if self._had_instance_generate:
            self.model.generate = self._previous_generate
        else:
            del self.model.generate
        self.active = False


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:  # models that refuse dynamic switching
        model.config._attn_implementation = name


# -------------------------------------------------------------- limits checked before generating
# transformers' default draft length (GenerationConfig._get_default_generation_params)
DEFAULT_ASSISTANT_TOKENS = 20


def check_generate_limits(config: SpectralConfig, model, kwargs: dict) -> None:
    """Refuse, before anything runs, a ``generate`` call this cache's configuration cannot serve.

    Assisted and prompt-lookup decoding remove rejected draft tokens with ``crop``, exact only
    within the newest ``hot_buffer_size`` tokens; a longer draft would fail mid-generation.
    The draft length is the assistant's ``num_assistant_tokens`` (default 20) under the
    ``"constant"`` schedule; the heuristic schedules grow it by 2 after every fully accepted
    draft, so only ``max_new_tokens`` bounds it; prompt lookup drafts
    ``prompt_lookup_num_tokens``. Raises `ValueError` naming both values.
    """
    gen = kwargs.get("generation_config") or model.generation_config

    def get(name):
        return kwargs[name] if kwargs.get(name) is not None else getattr(gen, name, None)

    hot = config.hot_buffer_size
    drafts = []
    assistant = kwargs.get("assistant_model")
    if assistant is not None or get("assistant_early_exit") is not None:
        agen = (assistant if assistant is not None else model).generation_config
        n = agen.num_assistant_tokens if agen.num_assistant_tokens is not None else DEFAULT_ASSISTANT_TOKENS
        schedule = agen.num_assistant_tokens_schedule or "constant"
        if schedule == "constant":
            drafts.append((int(n), f"num_assistant_tokens={int(n)}"))
        else:
            bound = get("max_new_tokens")
            bound = float("inf") if bound is None else max(int(n), int(bound))
            drafts.append((bound, f"num_assistant_tokens={int(n)} under the {schedule!r} schedule, which grows it "
                                  f"up to max_new_tokens={get('max_new_tokens')}"))
    lookup = get("prompt_lookup_num_tokens")
    if lookup is not None:
        drafts.append((int(lookup), f"prompt_lookup_num_tokens={int(lookup)}"))
    for draft, what in drafts:
        if draft > hot:
            raise ValueError(
                f"spectral_kv: assisted decoding drafts up to {draft} tokens ({what}), more than "
                f"hot_buffer_size={hot}: rejected drafts are removed with crop, which is exact only within the "
                f"newest hot_buffer_size tokens. Set the assistant's generation_config.num_assistant_tokens (or "
                f"prompt_lookup_num_tokens) <= {hot} with num_assistant_tokens_schedule='constant', or "
                f"hot_buffer_size >= {draft if draft != float('inf') else 'max_new_tokens'}"
            )


def patch_model(model, config: SpectralConfig, *, verbose: bool | None = None) -> SpectralPatch:
    """Route a transformers model's attention and ``generate`` cache through spectral_kv.

    Only this model instance changes: its config's attention implementation and an
    instance-level ``generate`` that supplies a fresh `SpectralCache` whenever the caller
    passes no ``past_key_values`` (and ``use_cache`` is not False).
    """
    verbose = config.verbose if verbose is None else verbose
    SpectralCache(config.replace(verbose=False), model.config)  # validate against the model now
    handle = SpectralPatch(model, config)
    _set_attn(model, ATTENTION_NAME)
    original = handle._previous_generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = handle.new_cache()
        cache = kwargs.get("past_key_values")
        if isinstance(cache, SpectralCache):
            check_generate_limits(cache.config, model, kwargs)
        return original(*args, **kwargs)

    model.generate = generate
    handle.active = True
    if verbose:
        probe = SpectralCache(config.replace(verbose=False), model.config)
        n = len(probe.spectral_layers)
        print(
            f"spectral_kv: patched {type(model).__name__}: {n}/{len(probe.layers)} layers compressed "
            f"({config.summary()})"
        )
    return handle
