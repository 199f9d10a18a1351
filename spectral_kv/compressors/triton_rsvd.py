"""`triton_rsvd`: the CUDA-graph-capturable randomized SVD of `kernels/rsvd.py` as a compressor.

On CUDA each block shape gets one captured CUDA graph (sketch drawn once from ``config.seed``,
CholeskyQR2 power iterations, fixed-sweep Jacobi eigensolver), replayed for every later block
of that shape: the algorithm is ~800 small kernels, so replay rather than eager launches is
what makes it fast (benchmarks/NOTES_kernels.md). Inside someone else's capture, or for
shapes not worth a graph, the same ops run eagerly.

On CPU there is nothing to capture, and the Jacobi's ~2,000 tiny ops cost ~1 s per call there,
so the CPU path is the algorithm's reference twin (same sketch and power iterations, LAPACK
Householder QR and a small exact SVD; `randomized_svd_lowrank_reference`): the same function up
to rounding (tests/test_kernels_rsvd.py checks the two agree). ``TritonRSVD.cpu_capturable``
forces the capturable ops on CPU too (tests).

The small l x l eigensolver is the torch-ops Jacobi, captured in the same graph. The Triton
kernel `kernels/jacobi.py` (one launch instead of ~2,000 tiny ops) is opt-in with
``TritonRSVD.triton_jacobi = True``: on the H100 it failed its accuracy check at l = 40
(benchmarks/NOTES_kernels.md); the benchmark times both. The GEMMs stay in cuBLAS.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..kernels import jacobi
from ..kernels.rsvd import _sketch, randomized_svd_lowrank, randomized_svd_lowrank_reference
from .base import LowRankCompressor, register_compressor

__all__ = ["TritonRSVD", "GraphedRSVD"]


class GraphedRSVD:
    """One captured CUDA graph of :func:`randomized_svd_lowrank` for a fixed input shape.

    The Gaussian sketch depends only on (shape, seed), so it is drawn once and stays a
    constant of the graph; each call copies ``x`` into the static input and replays.
    """

    def __init__(self, x: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int, eigh=None) -> None:
        n, t, d = x.shape
        self.x = torch.empty_like(x, dtype=torch.float32)
        self.sketch = _sketch(self.x, min(rank + oversample, t, d), seed)
        run = lambda: randomized_svd_lowrank(  # noqa: E731
            self.x, rank, oversample, power_iters, seed, sketch=self.sketch, eigh=eigh
        )
        self.x.copy_(x)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: caches index tensors, cuBLAS handles
            run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.coeffs, self.basis = run()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.x.copy_(x)
        self.graph.replay()
        return self.coeffs.clone(), self.basis.clone()


@register_compressor("triton_rsvd")
class TritonRSVD(LowRankCompressor):
    """Randomized SVD with CholeskyQR2 + Jacobi (no host syncs), CUDA-graph replayed on GPU.

    Uses ``config.seed``, ``rsvd_oversample`` and ``rsvd_power_iters`` like ``randomized_svd``.
    Graphs are shared by all instances (every layer's key compressor compresses the same
    shape) and kept for the ``max_graphs`` most recent (shape, rank, knobs); calls with more
    than ``max_graph_matrices`` matrices (a long prefill compresses many blocks at once, a
    once-off shape whose graph would only hold memory) run eagerly.
    """

    config_fields = ("rank", "bits", "basis_dtype", "seed", "rsvd_oversample", "rsvd_power_iters")

    max_graphs = 8
    max_graph_matrices = 1024
    use_cuda_graphs = True
    cpu_capturable = False
    # Off by default: on the H100 the Triton Jacobi failed its accuracy check at sketch size 40
    # (rank 32 + 8); the torch-ops Jacobi is captured in the same CUDA graph.
    triton_jacobi = False
    _graphs: OrderedDict[tuple, GraphedRSVD] = OrderedDict()

    def _graphable(self, x: torch.Tensor) -> bool:
        return (
            self.use_cuda_graphs
            and x.is_cuda
            and x.shape[0] <= self.max_graph_matrices
            and not torch.cuda.is_current_stream_capturing()
        )

    def _eigh(self, x: torch.Tensor, rank: int):
        sketch = min(rank + self.config.rsvd_oversample, x.shape[1], x.shape[2])
        if self.triton_jacobi and x.is_cuda and jacobi.HAS_TRITON and sketch <= 64:
            return jacobi.jacobi_eigh_triton
        return None

    def factorize(self, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        x = x.float()
        if not x.is_cuda and not self.cpu_capturable:
            return randomized_svd_lowrank_reference(x, rank, c.rsvd_oversample, c.rsvd_power_iters, c.seed)
        eigh = self._eigh(x, rank)
        if not self._graphable(x):
            return randomized_svd_lowrank(x, rank, c.rsvd_oversample, c.rsvd_power_iters, c.seed, eigh=eigh)
        key = (tuple(x.shape), rank, c.rsvd_oversample, c.rsvd_power_iters, c.seed, x.device, eigh is not None)
        graphs = TritonRSVD._graphs
        runner = graphs.get(key)
        if runner is None:
            runner = GraphedRSVD(x, rank, c.rsvd_oversample, c.rsvd_power_iters, c.seed, eigh)
            graphs[key] = runner
            while len(graphs) > self.max_graphs:
                graphs.popitem(last=False)
        else:
            graphs.move_to_end(key)
        return runner(x)
