"""Host (Python) time per decode step that spectral_kv adds to ``generate``, per layer, on the CPU.

    PYTHONPATH=. python benchmarks/host_overhead.py [--steps 16] [--ctx 1200] [--block-size 256]
                                                    [--profile-steps 8] [--no-profile]

A tiny Mistral (hidden 64, 32 layers, 8 query / 2 KV heads, head_dim 64, random fp32 weights)
makes the model's own compute negligible, so the step time is host time: transformers' Python
plus ours. The prompt (``--ctx`` tokens, batch 1) is prefilled through the model, so with
``--block-size 256`` the default context leaves 4 cold blocks per layer. It prints ms per decode
step of ``generate`` (difference of two generate lengths as in `e2e_decode.generate_step_ms`,
best of ``--repeats``, in thread CPU time) for

* ``dynamic``: `DynamicCache` + SDPA (the baseline: what transformers itself costs);
* ``balanced``: `SpectralCache` with the ``balanced`` preset and the default attention
  (on CPU the torch ``spectral`` strategy);
* ``balanced fused``: the CUDA route, forced on the CPU. `FusedAttention`'s device test
  (``fused._kernel_runs_on``) is patched to say yes, and ``quant_fused.quant_decode`` to a
  wrapper that runs the real `spectral_kv.kernels.quant_decode` (input checks, the
  ``triton_op`` dispatch, launch preparation: layouts, segments, strides, workspaces) with
  the Triton launches replaced by no-ops, and then returns `quant_decode_reference`'s output.
  So the glue (`attention/quant_fused.py`), the kernel wrapper's host work and the view
  construction are all timed, and so is the REFERENCE's own torch compute (it stands in for
  the kernel's GPU time, which on a GPU overlaps with the host): the fused row's added ms is an
  upper bound on our host time of that route (``fused-ref``: the reference's measured time taken
  out). The patches live in this script only;
* ``glue``: the same route with zeros in place of the reference's output (the tokens generated
  are then meaningless, the host work is the same): our host time of the CUDA route alone.

and our added ms per layer per step ((spectral - dynamic) / layers; a difference of two noisy
numbers), the thread CPU time spent inside our per-layer entry points (``SpectralLayer.update``
and the "spectral_kv" attention function, wrapped with timers here: the steadier number, though
it leaves out the once-per-step mask function), and the aten ops (roughly GPU launches) and host
syncs we add per layer per step (exact counts, `OpCounter`), and the Python function calls we
add per layer per step (cProfile's count: exact, the best proxy of host work on a busy machine). Then a cProfile of
``--profile-steps`` decode steps of each spectral mode, top 30 of spectral_kv's functions by
cumulative and by own time. Threads are pinned to 1 so that the numbers measure the host,
not how many cores are free; expect a few % of noise on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections import Counter

import torch
from torch.utils import _python_dispatch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import spectral_kv  # noqa: E402,F401  (registers the "spectral_kv" attention)
from spectral_kv import SpectralCache, SpectralConfig  # noqa: E402
from spectral_kv.attention import fused as fused_mod  # noqa: E402
from spectral_kv.attention import quant_fused as quant_fused_mod  # noqa: E402
from spectral_kv.kernels import quant_decode as qd_mod  # noqa: E402
from transformers import DynamicCache, MistralConfig  # noqa: E402

from bench_e2e import build_model  # noqa: E402


REFERENCE_S = [0.0, 0]  # seconds spent in the fused mode's quant_decode_reference stand-in, calls


class OpCounter(_python_dispatch.TorchDispatchMode):
    """Counts aten ops (on a GPU roughly the kernel launches, views included) and host syncs
    (``_local_scalar_dense``: ``bool``/``item`` of a tensor; on a GPU each stalls the host
    until the device catches up, so host and device time add instead of overlapping)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def tiny_config(layers: int) -> MistralConfig:
    return MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=None,
                         max_position_embeddings=1 << 20, pad_token_id=0)


class _NoLaunch:
    """Stands in for ``wrap_triton(kernel)``: ``[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def forced_fused_route(reference: bool = True):
    """The CUDA fused route on CPU tensors, the kernel replaced by its reference (see the module),
    or (``reference=False``, the ``glue`` mode) by zeros: the host work alone."""
    real_runs_on, real_qd, real_wrap = fused_mod._kernel_runs_on, quant_fused_mod.quant_decode, qd_mod.wrap_triton

    def quant_decode_host_then_reference(*args, **kwargs):
        out = real_qd(*args, **kwargs)  # checks + op dispatch + launch prep; the launches are no-ops
        t0 = time.perf_counter()
        with _python_dispatch._disable_current_modes():  # the op counter skips the stand-in's ops
            out = qd_mod.quant_decode_reference(*args) if reference else torch.zeros_like(out)
        REFERENCE_S[0] += time.perf_counter() - t0
        REFERENCE_S[1] += 1
        return out

    fused_mod._kernel_runs_on = lambda t: True
    quant_fused_mod.quant_decode = quant_decode_host_then_reference
    qd_mod.wrap_triton = lambda kernel: _NoLaunch()
    try:
        yield
    finally:
        fused_mod._kernel_runs_on, quant_fused_mod.quant_decode, qd_mod.wrap_triton = real_runs_on, real_qd, real_wrap


def prefilled(model, kind: str, ctx: int, block_size: int):
    """A cache holding a random ``ctx``-token prompt of batch 1, prefilled through ``model``."""
    ids = torch.randint(1, 128, (1, ctx), generator=torch.Generator().manual_seed(0))
    if kind == "dynamic":
        model.config._attn_implementation = "sdpa"
        cache = DynamicCache(config=model.config)
    else:
        model.config._attn_implementation = "spectral_kv"
        attention = "fused" if kind in ("fused", "glue") else None
        cfg = SpectralConfig.preset("balanced", block_size=block_size, attention=attention, verbose=False)
        cache = SpectralCache(cfg, model.config)
    with torch.no_grad(), route(kind):
        model(ids, past_key_values=cache, use_cache=True)
    if kind != "dynamic":
        cold = cache.spectral_layers[0].tiers.n_cold
        if not all(cold):
            raise ValueError(f"--ctx {ctx} with --block-size {block_size} leaves no cold block (n_cold={cold})")
    return cache


def route(kind: str):
    if kind in ("fused", "glue"):
        return forced_fused_route(reference=kind == "fused")
    return contextlib.nullcontext()


def check_fused_route(cache) -> None:
    """The fused mode really took the kernel route in every layer (else it measures the fallback)."""
    for layer in cache.spectral_layers:
        s = layer.strategy
        if getattr(s, "kernel_calls", 0) == 0 or getattr(s, "fallback_calls", 1) != 0:
            raise RuntimeError(f"layer {layer.layer_idx}: fused mode ran {getattr(s, 'kernel_calls', 0)} kernel / "
                               f"{getattr(s, 'fallback_calls', '?')} fallback decode steps")


def _generate(model, cache, n):
    seq = int(cache.get_seq_length())
    ids = torch.ones(1, seq + 1, dtype=torch.long)
    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                   min_new_tokens=n, do_sample=False)


def step_ms(model, cache, steps: int, repeats: int) -> float:
    """ms per decode step: best over ``repeats`` of generate(2 + steps) minus best of generate(2),
    in this thread's CPU time (`time.thread_time`: with torch on one thread that is all the
    work, and other processes on a shared machine do not count), after a warm-up."""
    _generate(model, cache, 2)
    best = {}
    for _ in range(repeats):
        for n in (2, 2 + steps):
            t0 = time.thread_time()
            _generate(model, cache, n)
            best[n] = min(best.get(n, float("inf")), time.thread_time() - t0)
    return 1000 * (best[2 + steps] - best[2]) / steps


@contextlib.contextmanager
def timed_entry_points(acc: dict):
    """Thread CPU time inside our two per-layer entry points, ``SpectralLayer.update`` and the
    registered "spectral_kv" attention function: ``acc[name]`` lists each call's seconds."""
    from transformers import AttentionInterface

    from spectral_kv.integrations.transformers import attention as attn_mod
    from spectral_kv.integrations.transformers.cache import SpectralLayer

    real_update, real_forward = SpectralLayer.update, attn_mod.spectral_attention_forward

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc.setdefault(key, []).append(time.thread_time() - t0)
        return wrapper

    SpectralLayer.update = timed(real_update, "update")
    AttentionInterface.register(attn_mod.ATTENTION_NAME, timed(real_forward, "attention"))
    try:
        yield
    finally:
        SpectralLayer.update = real_update
        AttentionInterface.register(attn_mod.ATTENTION_NAME, real_forward)


def inside_us(model, cache, kind: str, steps: int, repeats: int) -> float:
    """us of thread CPU time per layer per decode step inside our entry points: the median call
    of each (over ``repeats`` generate calls of ``steps`` tokens: robust to a loaded machine)."""
    acc: dict = {}
    with route(kind), timed_entry_points(acc):
        for _ in range(repeats):
            _generate(model, cache, steps)
    return 1e6 * (statistics.median(acc["update"]) + statistics.median(acc["attention"]))


def python_calls_per_step(model, cache, kind: str, steps: int) -> float:
    """Python function calls (cProfile's count, C functions included) per decode step: generate
    (2 + steps) minus generate(2), / steps. Deterministic, unlike times on a shared machine."""
    calls = []
    for n in (2, 2 + steps):
        prof = cProfile.Profile()
        with route(kind):
            prof.enable()
            _generate(model, cache, n)
            prof.disable()
        calls.append(pstats.Stats(prof).total_calls)
    return (calls[1] - calls[0]) / steps


def ops_per_step(model, cache, kind: str, steps: int) -> Counter:
    """aten ops per decode step: the counts of generate(2 + steps) minus generate(2), / steps."""
    counts = []
    for n in (2, 2 + steps):
        with route(kind), torch.no_grad(), OpCounter() as counter:
            _generate(model, cache, n)
        counts.append(counter.ops)
    diff = Counter(counts[1])
    diff.subtract(counts[0])
    return Counter({op: c / steps for op, c in diff.items() if c})


def profile(model, cache, kind: str, steps: int, top: int = 30) -> str:
    seq = int(cache.get_seq_length())
    ids = torch.ones(1, seq + 1, dtype=torch.long)
    prof = cProfile.Profile()
    with route(kind), torch.no_grad():
        prof.enable()
        model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=steps,
                       min_new_tokens=steps, do_sample=False)
        prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- {kind}: {steps} decode steps, top {top} spectral_kv functions by {key} ---\n")
        st.sort_stats(key).print_stats("spectral_kv", top)
    return out.getvalue()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=1200)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many step-time measurements")
    ap.add_argument("--profile-steps", type=int, default=8)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--modes", default="dynamic,balanced,fused,glue")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(tiny_config(args.layers), "cpu", torch.float32)
    modes = args.modes.split(",")
    ms, caches, ops, inside, pycalls = {}, {}, {}, {}, {}
    for kind in modes:
        cache = prefilled(model, kind, args.ctx, args.block_size)
        REFERENCE_S[:] = [0.0, 0]
        with route(kind):
            ms[kind] = step_ms(model, cache, args.steps, args.repeats)
        if kind in ("fused", "glue"):
            check_fused_route(cache)
            ref_ms = 1000 * REFERENCE_S[0] / REFERENCE_S[1] * args.layers
        ops[kind] = ops_per_step(model, cache, kind, 4)
        pycalls[kind] = python_calls_per_step(model, cache, kind, 4)
        if kind != "dynamic":
            inside[kind] = inside_us(model, cache, kind, args.steps, args.repeats)
        caches[kind] = cache
    print(f"tiny Mistral, {args.layers} layers, batch 1, ctx {args.ctx}, block_size {args.block_size}, "
          f"{args.steps} steps, best of {args.repeats}, torch threads 1")
    base = ms.get("dynamic")
    for kind in modes:
        line = f"  {kind:10s} {ms[kind]:8.3f} ms/step"
        if base is not None and kind != "dynamic":
            added = ms[kind] - base
            line += f"   added {added:7.3f} ms/step = {1000 * added / args.layers:7.1f} us/layer/step   " \
                    f"(x{ms[kind] / base:.2f} dynamic)"
        print(line)
        if kind == "fused":
            added = ms[kind] - ref_ms - (base or 0.0)
            print(f"  {'fused-ref':10s} {ms[kind] - ref_ms:8.3f} ms/step   added {added:7.3f} ms/step = "
                  f"{1000 * added / args.layers:7.1f} us/layer/step   (the reference's {ref_ms:.3f} ms/step taken out)")
    print("thread CPU time inside SpectralLayer.update + the spectral_kv attention, per layer per step:")
    for kind, us in inside.items():
        print(f"  {kind:10s} {us:7.1f} us" + ("   (the reference's compute included)" if kind == "fused" else ""))
    print("aten ops per layer per decode step that spectral_kv adds (incl. views; syncs = _local_scalar_dense):")
    for kind in modes:
        if kind == "dynamic" or "dynamic" not in ops:
            continue
        diff = Counter(ops[kind])
        diff.subtract(ops["dynamic"])
        per_layer = {op: c / args.layers for op, c in diff.items() if abs(c) > 1e-9}
        total = sum(per_layer.values())
        syncs = per_layer.get("_local_scalar_dense", 0.0)
        top = ", ".join(f"{op} {c:.2g}" for op, c in sorted(per_layer.items(), key=lambda x: -x[1])[:14])
        print(f"  {kind:10s} {total:6.1f} ops, {syncs:4.1f} syncs: {top}")
    if "dynamic" in pycalls:
        print("Python function calls (cProfile) per layer per decode step that spectral_kv adds:")
        for kind in modes:
            if kind != "dynamic":
                print(f"  {kind:10s} {(pycalls[kind] - pycalls['dynamic']) / args.layers:7.1f}")
    if not args.no_profile:
        for kind in modes:
            if kind != "dynamic":
                model.config._attn_implementation = "spectral_kv"
                print(profile(model, caches[kind], kind, args.profile_steps))


if __name__ == "__main__":
    main()
