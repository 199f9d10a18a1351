"""Compressors: the registry and the built-in entries (importing registers them)."""

from .base import COMPRESSORS, Compressor, LowRankCompressor, register_compressor
from .exact import ExactSVD
from .randomized import RandomizedSVD, randomized_svd

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "LowRankCompressor",
    "register_compressor",
    "ExactSVD",
    "RandomizedSVD",
    "randomized_svd",
]
