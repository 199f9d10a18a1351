"""Evaluation harness: perplexity delta, needle-in-a-haystack, attention fidelity and bytes
of the spectral cache side by side with baselines (exact, KIVI, transformers
QuantizedCache, kvpress) on the same data.  Entry point: ``spectral-kv eval``
(:func:`spectral_kv.eval.run.run_eval`)."""

from .methods import DEFAULT_METHODS, QUICK_METHODS, CacheMethod, make_method

__all__ = ["CacheMethod", "make_method", "DEFAULT_METHODS", "QUICK_METHODS"]
