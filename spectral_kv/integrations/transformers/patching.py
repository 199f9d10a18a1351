"""`patch_model`: route one transformers model's attention and ``generate`` cache through spectral_kv,
and `check_generate_limits`: refuse, before anything runs, a ``generate`` call the cache cannot serve."""

from __future__ import annotations

import functools
from typing import Any

from ...config import SpectralConfig
from .attention import ATTENTION_NAME
from .cache import SpectralCache
from .tensor_parallel import check_split, tp_size

__all__ = ["SpectralPatch", "patch_model", "check_generate_limits", "DEFAULT_ASSISTANT_TOKENS"]


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
    check_split(model.config, tp_size(model), "patch_unsloth_attention")
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
