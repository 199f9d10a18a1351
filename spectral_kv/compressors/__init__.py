"""Compressors: the registry and the built-in entries (importing registers them)."""

from .base import COMPRESSORS, Compressor, FactoredCompressor, LowRankCompressor, register_compressor
from .exact import ExactSVD
from .grouped import GroupQuantCompressor, HadamardCompressor
from .kivi import Kivi2, Kivi4, KiviCompressor
from .randomized import RandomizedSVD, randomized_svd
from .spectral_quant import SpectralQuantCompressor
from .triton_rsvd import TritonRSVD

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "FactoredCompressor",
    "LowRankCompressor",
    "GroupQuantCompressor",
    "HadamardCompressor",
    "register_compressor",
    "ExactSVD",
    "KiviCompressor",
    "Kivi4",
    "Kivi2",
    "RandomizedSVD",
    "randomized_svd",
    "SpectralQuantCompressor",
    "TritonRSVD",
]
