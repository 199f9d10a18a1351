"""`patch_unsloth_attention`: the one-call entry point (plain transformers models and Unsloth).

What it was given decides what it does (features of the model object, not version strings;
see UNSLOTH_NOTES.md beside this file for the Unsloth source this follows):

=====================  ==========================================================  ==========
path                   how it is recognised                                         result
=====================  ==========================================================  ==========
``transformers``       no Unsloth feature                                           patched
``unsloth_cpu``        instance ``generate`` whose function has ``_unsloth_cpu``    patched
``unsloth_gated``      modules carry ``_unsloth_fast_path`` (Unsloth >= 2026.10.9)  patched
``unsloth_ungated``    Unsloth fast ``generate`` / forwards, no per-model gate      raises
``unsloth_fastmodel``  ``unsloth_base_fast_generate`` or compiled Unsloth modules   raises
=====================  ==========================================================  ==========

On the gated CUDA fast path the patch clears ``_unsloth_fast_path`` on this model's modules only
(so Unsloth's gated class methods run the stock transformers forwards for this model, and every
other model keeps the fast path), drops the ``paged_attention`` decode buffers the fast path
left on the attention modules, then applies the plain transformers patch (`patch_model`) on top
of Unsloth's own ``generate`` wrapper, which keeps a caller-supplied `Cache` as it is.
``unpatch()`` puts every flag back to its previous value and the instance ``generate`` back.
No class is ever modified.

Why this module is longer than ~350 lines: detecting which of Unsloth's paths a model is on,
switching its fast path off for one model and restoring it are one state machine over the same
flags (see UNSLOTH_NOTES.md); split, its invariants would be read in three places.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import warnings
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from ..config import SpectralConfig
from ..presets import design_call_fields
from .transformers import COUNTERS, SpectralCache, SpectralPatch, patch_model

__all__ = [
    "MIN_UNSLOTH",
    "PATHS",
    "UnslothPatch",
    "UnsupportedUnslothError",
    "detect_unsloth_path",
    "patch_unsloth_attention",
]

# The first release with the per-model `_unsloth_fast_path` gate (2026.10.8 has none; see notes).
MIN_UNSLOTH = Version("2026.10.9")
PATHS = ("transformers", "unsloth_cpu", "unsloth_gated", "unsloth_ungated", "unsloth_fastmodel")
_DESCRIPTION = {
    "transformers": "plain transformers model",
    "unsloth_cpu": "Unsloth CPU backend (stock transformers forwards)",
    "unsloth_gated": "Unsloth CUDA fast path, gated per model",
    "unsloth_ungated": "Unsloth CUDA fast path without a per-model gate (older Unsloth)",
    "unsloth_fastmodel": "Unsloth FastModel",
}
# Per-attention-module state of Unsloth's fast decode (unsloth/models/_decode_graphs.py:313-320,
# alloc_decode_buffers :167-250). Stale after our patch: the stock forward never reads them.
_DECODE_BUFFERS = (
    "paged_attention",
    "paged_attention_K",
    "paged_attention_V",
    "temp_QA",
    "temp_KV",
    "RH_Q",
    "temp_O",
    "attention",
    "scalar",
    "half_head_dim",
    "_unsloth_graph_buffers",
    "_unsloth_decode_graphs",
)
_FLAG = "_unsloth_fast_path"
_MARK = "_spectral_kv_unsloth_patch"
_MISSING = object()


class UnsupportedUnslothError(RuntimeError):
    """The model comes from an Unsloth path that cannot be routed through spectral_kv."""


def unsloth_version() -> str | None:
    """Installed Unsloth version (the imported module's, else the distribution's), or None."""
    module = sys.modules.get("unsloth")
    version = getattr(module, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("unsloth")
    except importlib.metadata.PackageNotFoundError:
        return None


def _instance_generate_func(model):
    """The function behind an instance-level ``generate`` (Unsloth installs theirs per instance)."""
    gen = model.__dict__.get("generate")
    return getattr(gen, "__func__", gen) if gen is not None else None


def _class_methods(module):
    """(name, function) of the callables a module's class (MRO) defines."""
    seen = set()
    for cls in type(module).__mro__:
        if cls in (torch.nn.Module, object):
            continue
        for name, value in vars(cls).items():
            if name in seen or not callable(value):
                continue
            seen.add(name)
            yield name, value


def _unsloth_defined(fn) -> bool:
    return str(getattr(fn, "__module__", "") or "").startswith("unsloth.")


def detect_unsloth_path(model) -> str:
    """Which of `PATHS` ``model`` is on (see the module docstring for the features read)."""
    func = _instance_generate_func(model)
    name = getattr(func, "__name__", "")
    if func is not None and getattr(func, "_unsloth_cpu", False):
        return "unsloth_cpu"
    modules = list(model.modules())
    if name == "unsloth_base_fast_generate" or any(
        type(m).__module__.startswith("unsloth_compiled_module") for m in modules
    ):
        return "unsloth_fastmodel"
    flagged = any(_FLAG in m.__dict__ for m in modules)
    ungated = gated = False
    for m in {type(m): m for m in modules}.values():  # one instance per class is enough
        if type(m).__module__.startswith("unsloth"):
            # Unsloth's own module classes (its LlamaRotaryEmbedding replaces transformers' as a module
            # global, llama.py:3479-3484) are never gated and need not be: they serve stock callers.
            # Only transformers classes that pre_patch rewrote decide gated vs ungated.
            continue
        for _, fn in _class_methods(m):
            if getattr(fn, "_unsloth_gated", False):
                gated = True
            elif _unsloth_defined(fn):
                ungated = True
    if flagged and not ungated:
        return "unsloth_gated"
    if flagged or ungated or gated or name == "unsloth_fast_generate":
        # A fast forward that ignores the flag, or an Unsloth generate with no flag to clear.
        return "unsloth_ungated"
    return "transformers"


class UnslothPatch:
    """What `patch_unsloth_attention` returns: the transformers `SpectralPatch` plus the Unsloth state.

    Attributes
    ----------
    path : str
        One of `PATHS`.
    generate_calls : int
        ``generate`` calls made through the patch.
    spectral_calls : int
        Spectral attention calls summed over those ``generate`` calls (per-cache counters, so
        other models in the process never count here).
    dropped_buffers : int
        Unsloth decode-buffer attributes removed when patching.
    """

    def __init__(self, model, inner: SpectralPatch, path: str, verbose: bool) -> None:
        self.model = model
        self.inner = inner
        self.path = path
        self.verbose = verbose
        self.generate_calls = 0
        self.spectral_calls = 0
        self.dropped_buffers = 0
        self.refreshed_flags = 0
        self._flags: dict[int, tuple[torch.nn.Module, Any]] = {}

    # ---------------------------------------------------------------- delegation
    @property
    def config(self) -> SpectralConfig:
        return self.inner.config

    @property
    def last_cache(self) -> SpectralCache | None:
        return self.inner.last_cache

    @property
    def active(self) -> bool:
        return self.inner.active

    def new_cache(self) -> SpectralCache:
        return self.inner.new_cache()

    def memory_report(self) -> dict[str, Any]:
        return self.inner.memory_report()

    def __repr__(self) -> str:
        return (
            f"UnslothPatch(path={self.path!r}, active={self.active}, generate_calls={self.generate_calls}, "
            f"spectral_calls={self.spectral_calls})"
        )

    # ---------------------------------------------------------------- fast-path gate
    def _clear_fast_path(self) -> int:
        """Set the flag False on every module (recording its previous state once); returns how many changed."""
        changed = 0
        for module in self.model.modules():
            key = id(module)
            if key not in self._flags:
                self._flags[key] = (module, module.__dict__.get(_FLAG, _MISSING))
            if module.__dict__.get(_FLAG, False):
                changed += 1
            module.__dict__[_FLAG] = False
        return changed

    def _restore_fast_path(self) -> None:
        for module, previous in self._flags.values():
            if previous is _MISSING:
                module.__dict__.pop(_FLAG, None)
            else:
                module.__dict__[_FLAG] = previous
        self._flags.clear()

    def _drop_decode_buffers(self) -> int:
        dropped = 0
        for module in self.model.modules():
            d = module.__dict__
            # Only modules that hold Unsloth decode state: "attention"/"scalar" are ordinary
            # attribute names elsewhere and must not be touched there.
            if not any(k in d for k in ("paged_attention", "_unsloth_graph_buffers", "_unsloth_decode_graphs")):
                continue
            for name in _DECODE_BUFFERS:
                if name in d:
                    del d[name]
                    dropped += 1
        return dropped

    # ---------------------------------------------------------------- lifecycle
    def unpatch(self) -> None:
        """Restore the model exactly: attention implementation, instance ``generate``, fast-path flags."""
        if not self.inner.active:
            return
        self.inner.unpatch()
        if self.path == "unsloth_gated":
            self._restore_fast_path()
        self.model.__dict__.pop(_MARK, None)

    def _after_generate(self, cache, counter_before: int) -> None:
        self.generate_calls += 1
        if isinstance(cache, SpectralCache):
            calls, tokens = cache.attention_calls(), cache.get_seq_length()
        else:  # the caller passed another cache (or none): only the process-wide counter can tell
            calls, tokens = COUNTERS["spectral_calls"] - counter_before, None
        self.spectral_calls += calls
        if self.generate_calls != 1:
            return
        if calls == 0:
            # Silent bypass is the failure this integration exists to prevent: always say it.
            warnings.warn(
                f"spectral_kv: the first generate on this {_DESCRIPTION[self.path]} never called the "
                f"spectral attention ({type(cache).__name__ if cache is not None else 'no cache'}); "
                "the KV cache was NOT compressed.",
                RuntimeWarning,
                stacklevel=3,
            )
            if self.verbose:
                print("spectral_kv: WARNING first generate bypassed the spectral attention (0 calls)")
        elif self.verbose:
            held = f", cache holds {tokens} tokens" if tokens is not None else ""
            print(f"spectral_kv: first generate OK: spectral attention called {calls} times{held}")


def _raise_unsupported(path: str) -> None:
    installed = unsloth_version() or "unknown"
    if path == "unsloth_ungated":
        raise UnsupportedUnslothError(
            f"spectral_kv: this model runs Unsloth's CUDA fast path without a per-model gate "
            f"(installed unsloth {installed}; the gate exists from unsloth {MIN_UNSLOTH}). Its decode "
            "keeps K/V in its own paged_attention buffers, converts any Cache to tuples and never "
            "calls a registered attention function, so spectral_kv would be bypassed silently. "
            f"Upgrade: pip install --upgrade --no-deps 'unsloth>={MIN_UNSLOTH}' 'unsloth_zoo>={MIN_UNSLOTH}'"
        )
    raise UnsupportedUnslothError(
        f"spectral_kv: Unsloth FastModel (installed unsloth {installed}) is not supported: its generate "
        "wrapper forces cache_implementation='static' even when past_key_values is passed (transformers "
        "then rejects the SpectralCache), and its compiled attention routes only flex attention through "
        "transformers' registry. There is no public per-model switch for either. Load the model with "
        "FastLanguageModel (Llama/Qwen/Mistral families) or plain transformers with "
        "attn_implementation='spectral_kv' and call patch_unsloth_attention on that."
    )


def patch_unsloth_attention(
    model,
    block_size: int = 512,
    k_rank_keys: int | None = None,
    k_rank_values: int | None = None,
    hot_buffer_size: int = 64,
    use_spectral_attention: bool = True,
    verbose: bool = True,
    **more,
) -> UnslothPatch:
    """Make ``model.generate(...)`` use the spectral KV cache, with no other change.

    Parameters
    ----------
    model : transformers PreTrainedModel, or a model from Unsloth's ``FastLanguageModel``
    block_size, k_rank_keys, k_rank_values, hot_buffer_size, use_spectral_attention, verbose
        The original design's parameters (see `SpectralConfig`). With ``verbose`` the path taken
        is printed at once, and after the first ``generate`` whether the spectral attention ran.
    **more
        Any other `SpectralConfig` field (``sink_tokens``, ``coeff_bits``, ``compressor``...),
        or ``config=SpectralConfig(...)`` to pass a whole config, or ``preset="balanced"``
        (``original``, ``fast``, ``max-compression``; see `spectral_kv.presets`); the named
        arguments then override its fields only where they differ from their defaults.

    Returns
    -------
    UnslothPatch
        ``unpatch()`` restores the model (and Unsloth's fast path); ``memory_report()``
        reports the latest cache; ``path`` says which path was taken.

    Raises
    ------
    UnsupportedUnslothError
        For Unsloth older than `MIN_UNSLOTH` on CUDA, and for ``FastModel`` on CUDA.
    RuntimeError
        If the model is already patched.
    """
    preset = more.pop("preset", None)
    base = more.pop("config", None) or preset  # a whole config, a preset name, or None (the default)
    named = dict(
        block_size=block_size,
        k_rank_keys=k_rank_keys,
        k_rank_values=k_rank_values,
        hot_buffer_size=hot_buffer_size,
        use_spectral_attention=use_spectral_attention,
        verbose=verbose,
    )
    defaults = SpectralConfig()
    changes = {k: v for k, v in named.items() if v is not None and v != getattr(defaults, k)}
    # explicit ranks without a compressor, preset or config: the low-rank learned-basis layout
    config = SpectralConfig.resolve(base, **design_call_fields(changes, more, base_given=base is not None))

    previous = model.__dict__.get(_MARK)
    if previous is not None and previous.active:
        raise RuntimeError("spectral_kv: this model is already patched; call .unpatch() on the first patch first")
    path = detect_unsloth_path(model)
    if path in ("unsloth_ungated", "unsloth_fastmodel"):
        _raise_unsupported(path)

    cleared = dropped = 0
    flags = None
    if path == "unsloth_gated":
        version = unsloth_version()
        try:
            too_old = version is not None and Version(version) < MIN_UNSLOTH
        except InvalidVersion:
            too_old = False
        if too_old:  # features say gated but the version predates it: trust neither, refuse
            _raise_unsupported("unsloth_ungated")
        flags = UnslothPatch(model, None, path, config.verbose)  # temporary holder for the flag record
        cleared = flags._clear_fast_path()
        dropped = flags._drop_decode_buffers()
    try:
        inner = patch_model(model, config, verbose=config.verbose)
    except Exception:
        if flags is not None:
            flags._restore_fast_path()
        raise
    patch = UnslothPatch(model, inner, path, config.verbose)
    if flags is not None:
        patch._flags, patch.dropped_buffers = flags._flags, dropped

    spectral_generate = model.generate  # patch_model's wrapper (injects a fresh SpectralCache)

    @functools.wraps(spectral_generate)
    def generate(*args, **kwargs):
        if patch.path == "unsloth_gated":
            # Unsloth's get_peft_model re-marks every module (llama.py:5450): re-clear, or the
            # fast path would silently take over again.
            again = patch._clear_fast_path()
            if again:
                patch.refreshed_flags += again
                warnings.warn(
                    f"spectral_kv: {again} modules had Unsloth's fast path switched back on after patching; "
                    "turned it off again for this model",
                    RuntimeWarning,
                    stacklevel=2,
                )
        before = COUNTERS["spectral_calls"]
        out = spectral_generate(*args, **kwargs)
        cache = kwargs.get("past_key_values")
        if cache is None:  # patch_model's wrapper supplied it (a Cache with 0 tokens is falsy: no `or`)
            cache = patch.inner.last_cache
        patch._after_generate(cache, before)
        return out

    model.generate = generate
    model.__dict__[_MARK] = patch
    if config.verbose:
        version = unsloth_version()
        extra = ""
        if path == "unsloth_gated":
            extra = (
                f"; fast path OFF for this model only ({cleared} modules), {dropped} stale decode-buffer "
                "attributes dropped; unpatch() restores it"
            )
        where = f" (unsloth {version})" if path.startswith("unsloth") else ""
        print(f"spectral_kv: path = {path}: {_DESCRIPTION[path]}{where}{extra}")
    return patch
