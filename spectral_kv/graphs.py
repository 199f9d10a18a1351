"""`StaticDecoder`: decoding on a frozen `SpectralCache`, each decode step one CUDA graph.

transformers' compiled generate needs a cache whose every operation is traceable; ours plans
block compression on the host. So the captured region is exactly the model's decode forward
(embedding, every layer's static decode step, the head and the token choice), and everything that
changes the cache's layout runs between replays in `SpectralCache.advance`:

1. prefill the prompt eagerly (any length, left padding allowed: padding is dropped then);
2. `SpectralCache.freeze(max_new_tokens)`: preallocated buffers, device-side counters;
3. one eager decode step on a side stream (warms up cuBLAS / Triton), then capture one step
   into a `torch.cuda.CUDAGraph` reading static input buffers (token, position);
4. per token: copy the token and position in, replay, ``cache.advance()``; re-capture only
   when a cold pool had to grow (``cache.storage_version`` changed).

Without CUDA (or with ``use_cuda_graph=False``) the same steps run eagerly, which is how the
CPU tests check that a captured step computes what the dynamic cache computes.

``compile=True`` runs the decode forward through ``torch.compile`` (Inductor, its own CUDA graphs
off: this driver captures): the model's elementwise ops (RMSNorm, RoPE, SiLU, residuals) fuse,
which is what transformers' static cache + compile has over an eager graph. The first decode step
still runs the plain forward (it counts which attention path ran: compiled steps do not touch the
Python counters, which would make Dynamo recompile every step), the next one compiles, the one
after is captured; after a pool grows (new shapes) one compiled step runs before the re-capture,
so no compilation happens inside a capture.
"""

from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from .sampling import Sampling

__all__ = ["StaticDecoder", "STOP_CHECK_EVERY", "deferred_advance", "advance_deferred"]

_state = threading.local()


@contextlib.contextmanager
def deferred_advance():
    """While active, static decode steps leave their host side (`SpectralCache.advance`) and
    host checks to the caller: a CUDA-graph driver, for which the Python of a captured step runs
    once and its kernels at every replay."""
    previous = getattr(_state, "deferred", False)
    _state.deferred = True
    try:
        yield
    finally:
        _state.deferred = previous


def advance_deferred() -> bool:
    """Whether this thread is inside `deferred_advance`."""
    return getattr(_state, "deferred", False)

# With an EOS id, how often (in steps) the host checks whether every row has finished.
STOP_CHECK_EVERY = 16


class StaticDecoder:
    """Greedy or sampled generation with a frozen cache, optionally replayed as CUDA graphs.

    Parameters
    ----------
    model : transformers causal LM
        Running the ``"spectral_kv"`` attention (``attn_implementation="spectral_kv"`` or
        `spectral_kv.patch_unsloth_attention`).
    cache : SpectralCache
        An empty cache for this model; it is prefilled, frozen and filled by `generate`.
    use_cuda_graph : bool or None
        ``None``: when the model runs on CUDA.
    record_step_times : bool
        On CUDA, time every decode step (replay plus the host work after it) with CUDA
        events into `step_ms` (no host sync until the end).
    compile : bool or str
        Decode steps through ``torch.compile`` (module docstring): faster steps, a compilation
        (tens of seconds for a 7B model) at the first `generate` and after a pool grows, one per
        batch size. A string names the ``torch.compile`` backend (``True``: ``"inductor"``).

    Attributes
    ----------
    captures : int
        CUDA graphs captured by the latest `generate` (1 unless a pool had to grow).
    step_ms : list of float
        Per-step times of the latest `generate` when ``record_step_times``.
    """

    def __init__(self, model, cache, use_cuda_graph: bool | None = None, record_step_times: bool = False,
                 compile: bool = False) -> None:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if impl != "spectral_kv":
            raise ValueError(
                f"StaticDecoder needs the model to run the 'spectral_kv' attention, it runs {impl!r}: load it with "
                f"attn_implementation='spectral_kv' or call model.set_attn_implementation('spectral_kv')"
            )
        self.model = model
        self.cache = cache
        device = next(model.parameters()).device
        self.use_cuda_graph = device.type == "cuda" if use_cuda_graph is None else bool(use_cuda_graph)
        if self.use_cuda_graph and device.type != "cuda":
            raise ValueError(f"use_cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        self.captures = 0
        self.record_step_times = record_step_times and device.type == "cuda"
        if compile is not False and compile is not True and not (isinstance(compile, str) and compile):
            raise ValueError(f"compile must be True, False or a torch.compile backend name, got {compile!r}")
        self.compile = compile
        backend = "inductor" if compile is True else compile
        # Inductor's own CUDA graphs off: this driver captures the step itself.
        self._compiled = None if compile is False else torch.compile(
            model.forward, backend=backend, dynamic=False,
            options={"triton.cudagraphs": False} if backend == "inductor" else None)
        self.step_ms: list[float] = []

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` tokens, ``[B, L + n]``: greedy, or sampled with
        ``do_sample=True`` (`spectral_kv.sampling.Sampling`: temperature, top-k, top-p as
        transformers applies them; seed with ``torch.manual_seed``).

        ``attention_mask`` [B, L] marks left padding (1 = real token), as for ``generate``.
        With ``eos_token_id``, a row that emitted it gets ``pad_token_id`` (default: the first
        EOS id) afterwards, and decoding stops once every row has finished (checked every
        `STOP_CHECK_EVERY` steps, one host sync each; the output is trimmed to the step where
        the last row finished), as transformers' ``generate`` does. Without it, exactly
        ``max_new_tokens`` tokens. Raises `ValueError` if the model produced non-finite logits.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self._select = Sampling(do_sample, temperature, top_k, top_p)
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in eos):
            raise ValueError(f"eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
        self._eos = torch.tensor(eos, device=input_ids.device) if eos else None
        self._pad = pad_token_id
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if self.cache.get_seq_length() != 0:
            raise ValueError("StaticDecoder.generate needs an empty cache (call cache.reset() to reuse one)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        # Positions count real tokens only, as generate numbers a left-padded row.
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True).logits
        self._bad = ~torch.isfinite(logits[:, -1]).all()
        self._done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
        tokens = [self._finish(self._select(logits[:, -1]))]
        if max_new_tokens > 1:
            self._decode(tokens, attention_mask, length, max_new_tokens)
        if bool(self._bad):
            raise ValueError("StaticDecoder: the model produced NaN/Inf logits")
        out = torch.cat(tokens, dim=1)
        if self._eos is not None:  # trim to the step where the last row finished
            finished = torch.cumsum((out[:, :, None] == self._eos).any(-1), dim=1).bool().all(0)
            if bool(finished.any()):
                out = out[:, : int(finished.nonzero()[0]) + 1]
        return torch.cat((input_ids, out), dim=1)

    @torch.no_grad()
    def generate_from_cache(self, next_ids: torch.Tensor, max_new_tokens: int = 32) -> torch.Tensor:
        """Greedy decoding from a cache that already holds the context: what `generate` does
        after its prompt, for a cache filled elsewhere (restored with `SpectralCache.load`, or
        filled by a benchmark). Every row must hold the same number of real tokens.

        Parameters
        ----------
        next_ids : Tensor [B, 1] int64
            The first token to feed (the one sampled after the context).
        max_new_tokens : int

        Returns
        -------
        Tensor [B, max_new_tokens]: the tokens chosen after ``next_ids``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        length = int(self.cache.get_seq_length())
        if length == 0:
            raise ValueError("StaticDecoder.generate_from_cache needs a cache holding the context (use generate)")
        if next_ids.dim() != 2 or next_ids.shape[1] != 1:
            raise ValueError(f"next_ids must be [batch, 1], got shape {tuple(next_ids.shape)}")
        self._select, self._eos, self._pad = Sampling(False, 1.0, 0, 1.0), None, None
        dev = next_ids.device
        self._bad = torch.zeros((), dtype=torch.bool, device=dev)
        self._done = torch.zeros(next_ids.shape[0], 1, dtype=torch.bool, device=dev)
        tokens = [next_ids]
        self._decode(tokens, torch.ones(next_ids.shape[0], length, dtype=torch.long, device=dev), length,
                     max_new_tokens + 1)
        if bool(self._bad):
            raise ValueError("StaticDecoder: the model produced NaN/Inf logits")
        return torch.cat(tokens[1:], dim=1)

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        """Rows that already emitted EOS get padding; rows emitting it now are marked done."""
        if self._eos is None:
            return out
        out = torch.where(self._done, torch.full_like(out, self._pad), out)
        self._done |= (out[:, :, None] == self._eos).any(-1)
        return out

    def _decode(self, tokens: list[torch.Tensor], attention_mask: torch.Tensor, length: int, max_new_tokens: int) -> None:
        self.cache.freeze(max_new_tokens)
        b, dev = attention_mask.shape[0], attention_mask.device
        self._ids = tokens[0].clone()
        self._pos = attention_mask.long().sum(1, keepdim=True)  # the next token's position per row
        self._cache_pos = torch.tensor([length], device=dev)
        self._mask = torch.ones(b, 1, 1, 1, dtype=torch.bool, device=dev)  # 4-D: transformers uses it as is
        self.captures = 0
        # warm: the storage version the function about to be captured last ran on (compiled, it
        # must have compiled for the current shapes before a capture)
        graph, version, warm, eager_done = None, None, None, False
        events = []
        with deferred_advance():
            for step in range(1, max_new_tokens):
                if self._eos is not None and step % STOP_CHECK_EVERY == 0 and bool(self._done.all()):
                    break
                if self.record_step_times:
                    events.append(torch.cuda.Event(enable_timing=True))
                    events[-1].record()
                current = self.cache.storage_version
                if self.use_cuda_graph and (graph is None or version != current):
                    graph = None
                    if warm is not None and (self._compiled is None or warm == current):
                        graph = self._capture()
                        version = current
                if graph is not None:
                    graph.replay()
                    out = self._out
                elif self.use_cuda_graph:
                    # the first step plain (it counts the attention path), then compiled if asked
                    compiled = self._compiled is not None and eager_done
                    out = self._warm_up(compiled)
                    eager_done = True
                    warm = current if compiled or self._compiled is None else None
                else:
                    out = self._step(self._compiled is not None)
                self.cache.advance()
                tokens.append(out.clone())
                self._ids.copy_(out)
                self._pos.add_(1)
                self._cache_pos.add_(1)
            self.cache.drain()
        if events:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
            events[-1].synchronize()
            self.step_ms = [a.elapsed_time(b) for a, b in zip(events, events[1:])]

    # ------------------------------------------------------------------ one step
    def _step(self, compiled: bool = False) -> torch.Tensor:
        kwargs = dict(input_ids=self._ids, attention_mask=self._mask, position_ids=self._pos,
                      past_key_values=self.cache, use_cache=True)
        if self._takes_cache_position:
            kwargs["cache_position"] = self._cache_pos
        logits = (self._compiled if compiled else self.model)(**kwargs).logits[:, -1]
        self._bad |= ~torch.isfinite(logits).all()
        return self._finish(self._select(logits))

    def _warm_up(self, compiled: bool = False) -> torch.Tensor:
        """A real step on a side stream (cuBLAS / Triton / Inductor set up before any capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self._step(compiled)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Record one decode step (nothing runs while capturing; every replay runs it)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._out = self._step(self._compiled is not None)
        self.captures += 1
        return graph
