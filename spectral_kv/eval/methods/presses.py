"""kvpress presses applied at the prefill: ``streaming``, ``snapkv``, ``knorm``, ``expected``
(option ``ratio``: fraction of the context evicted); ``kvpress:press=snapkv,ratio=0.5`` is the
same spelled generically. kvpress is optional and pins transformers (< 5.3 for 0.5.x): with it
missing or incompatible these methods raise ``ImportError`` naming the conflict."""

from __future__ import annotations

import sys

from .base import CacheMethod

__all__ = ["PRESSES", "PressMethod", "build_press", "KVPRESS_TRANSFORMERS", "check_kvpress_compat", "import_kvpress"]

PRESSES = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "expected": "ExpectedAttentionPress",
}
KVPRESS_TRANSFORMERS = "transformers<5.3 (kvpress 0.5.x)"


def check_kvpress_compat() -> None:
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


def import_kvpress():
    """Import kvpress, after checking it matches the installed transformers.

    kvpress wraps every registered attention function at import (for head-wise eviction such
    as AdaKV); the "spectral_kv" function keeps sdpa's positional order, so the wrap calls it
    correctly, but the presses used here do not need it, so our own entries are restored.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if "kvpress" not in sys.modules:
        check_kvpress_compat()
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


class PressMethod(CacheMethod):
    """A ``DynamicCache`` whose prefill runs under a kvpress press (``settings["_press"]``)."""

    def prefill_context(self, model):
        return self.settings["_press"](model)


def build_press(spec: str, name: str, opts: dict[str, str]) -> PressMethod:
    if name == "kvpress":
        name = opts.pop("press", "")
        if name not in PRESSES:
            raise ValueError(f"kvpress method {spec!r}: press={name!r}, want one of {sorted(PRESSES)}")
    kvpress = import_kvpress()
    ratio = float(opts.pop("ratio", 0.75))
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"kvpress method {spec!r}: ratio={ratio} must be in [0, 1) (fraction evicted)")
    press = getattr(kvpress, PRESSES[name])(compression_ratio=ratio)
    return PressMethod(spec, "kvpress", {"press": PRESSES[name], "ratio": ratio, "_press": press}, evicts=True)
