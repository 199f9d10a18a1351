"""The CUDA-graph capture the GPU benchmarks time: every fn run once on a side stream (Triton
compiles, cuBLAS and the allocator set up off the capture), then captured into one graph."""
from __future__ import annotations

import torch


def capture(fns) -> torch.cuda.CUDAGraph:
    """One graph that calls every fn once, in order (fns usually rotate input sets, so the
    working set exceeds the L2); nothing has run inside it yet."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g
