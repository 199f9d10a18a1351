"""Triton kernels, each beside its pure-PyTorch *_reference twin."""
