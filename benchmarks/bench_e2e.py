"""End-to-end part of gpu_decode_bench.py: a Mistral-7B-shaped model with random bf16 weights,
`generate` with `SpectralCache` (fused kernel) vs `DynamicCache` + SDPA.

Contexts are filled synthetically instead of by a prefill: a 32K-token prefill of a 7B model
through our prefill path (bool mask [B, 1, T, T], SDPA on decompressed blocks, then 64 blocks
x rows x layers compressed) would take minutes, and with random weights only the decode speed
means anything. DynamicCache layers get random bf16 K/V; SpectralLayers get random int8
coefficients, fp32 scales and fp16 bases of the shapes the compressor stores, plus 4 sinks and
64 hot tokens exact, i.e. the exact bytes a real cache of that length holds. The warm tier is
empty, so no block is compressed inside the timed window (compression is timed separately).
"""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache, MistralConfig

import spectral_kv  # noqa: F401  (registers the "spectral_kv" attention)
from spectral_kv import SpectralCache, SpectralConfig


def mistral_config(layers=32, tiny=False):
    if tiny:
        return MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=16, sliding_window=None,
                             max_position_embeddings=1 << 20, pad_token_id=0)
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=None,
                         max_position_embeddings=1 << 20, rope_theta=1e6)


def build_model(cfg, device, dtype):
    """A model of ``cfg`` (Mistral, else Llama) with random weights in ``dtype`` on ``device``."""
    from transformers import AutoModelForCausalLM

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fill_dynamic(model, batch, ctx, seed=0):
    cfg = model.config
    dev, dt = model.device, model.dtype
    g = torch.Generator(device=dev).manual_seed(seed)
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(batch, cfg.num_key_value_heads, ctx, cfg.head_dim, generator=g, device=dev, dtype=dt)
        cache.update(k, torch.randn(k.shape, generator=g, device=dev, dtype=dt), i)
    return cache


def fill_spectral(model, skcfg, batch, ctx, seed=0):
    """A SpectralCache holding ``ctx`` tokens per row: (ctx - sinks - hot) / block_size cold blocks."""
    cfg = model.config
    dev, dt = model.device, model.dtype
    h, d, t = cfg.num_key_value_heads, cfg.head_dim, skcfg.block_size
    s, hot = skcfg.sink_tokens, skcfg.hot_buffer_size
    nb = (ctx - s - hot) // t
    n_exact = ctx - nb * t
    g = torch.Generator(device=dev).manual_seed(seed)
    cache = SpectralCache(skcfg, cfg)
    for layer in cache.spectral_layers:
        ek = torch.randn(batch, h, n_exact, d, generator=g, device=dev, dtype=dt)
        layer.lazy_initialization(ek, ek)
        tiers = layer.tiers
        tiers.exact_k = ek
        tiers.exact_v = torch.randn(ek.shape, generator=g, device=dev, dtype=dt)
        tiers.n_exact, tiers.n_cold, tiers.seen = [n_exact] * batch, [nb] * batch, ctx
        for pool, r in ((tiers.cold_k, skcfg.k_rank_keys), (tiers.cold_v, skcfg.k_rank_values)):
            pool.parts = {
                "coeffs": torch.randint(-127, 128, (batch, h, nb, t, r), generator=g, device=dev, dtype=torch.int8),
                "scales": torch.rand(batch, h, nb, r, generator=g, device=dev) * (2.0 / 127),
                "basis": (torch.randn(batch, h, nb, r, d, generator=g, device=dev) / d**0.5).half(),
            }
    return cache


def cache_bytes(cache):
    if isinstance(cache, SpectralCache):
        return cache.memory_report()["total_bytes"]
    return sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))


def _generate(model, cache, batch, new_tokens):
    seq = cache.get_seq_length()
    ids = torch.ones(batch, seq + 1, dtype=torch.long, device=model.device)  # not the pad id
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def decode_tokens_per_s(model, cache, batch, steps):
    """Decode tokens/s (all rows) from the time difference of generate calls of 2 and 2 + steps
    tokens (best of two each, after a warm-up), so generate's fixed costs cancel."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    _generate(model, cache, batch, 2)
    best = {}
    for n in (2, 2 + steps, 2, 2 + steps):
        sync()
        t0 = time.perf_counter()
        _generate(model, cache, batch, n)
        sync()
        best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
    return batch * steps / max(best[2 + steps] - best[2], 1e-9)


def lossless_check(device, dtype, log):
    """Tiny Mistral: lossless SpectralCache (fused strategy, torch fallback path) == DynamicCache."""
    model = build_model(mistral_config(layers=2, tiny=True), device, torch.float32)
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        ref = model.generate(ids, past_key_values=DynamicCache(config=model.config), **kw)
        model.config._attn_implementation = "spectral_kv"
        sk = SpectralConfig(block_size=16, k_rank_keys=16, k_rank_values=16, hot_buffer_size=4, sink_tokens=2,
                            compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32", attention="fused", verbose=False)
        cache = SpectralCache(sk, model.config)
        got = model.generate(ids, past_key_values=cache, **kw)
    ok = torch.equal(ref, got) and all(sum(layer.tiers.n_cold) >= 4 for layer in cache.spectral_layers)
    log(f"  lossless SpectralCache(fused) == DynamicCache on a tiny Mistral (70 tokens, 4 blocks/row): "
        f"{'OK' if ok else 'FAIL'}")
    return ok


def fused_kernel_check(model, skcfg, log):
    """The fused kernel serves every decode step of the big model (no silent fallback), and its
    next-token logits match the torch `spectral` strategy on the same cache."""
    outs = []
    variants = [("fused", False), ("spectral", False), ("reconstruct", False)] + (
        [("fused", True)] if model.device.type == "cuda" else [])
    for name, compile_ in variants:
        t0 = time.perf_counter()
        cache = fill_spectral(model, skcfg.replace(attention=name, compile=compile_), 1, 4 * skcfg.block_size + 68,
                              seed=3)
        ids = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=model.device)
        with torch.no_grad():
            logits = model(ids[:, -1:], past_key_values=cache, attention_mask=torch.ones_like(ids)).logits
        outs.append((logits.float(), cache))
        if compile_:
            log(f"  compiled fused attend (fullgraph, dynamic): first step incl. compile {time.perf_counter() - t0:.1f} s")
    strategies = [layer.strategy for layer in outs[0][1].spectral_layers]
    served = all(s.kernel_calls == 1 and s.fallback_calls == 0 for s in strategies)
    rel = ((outs[0][0] - outs[1][0]).norm() / outs[1][0].norm()).item()
    # Noise floor: two torch computations of the same function (spectral in fp32 vs SDPA over the
    # decompressed blocks in bf16) through 32 random bf16 layers differ by this much too.
    floor = ((outs[2][0] - outs[1][0]).norm() / outs[1][0].norm()).item()
    tol = max(2e-2, 1.5 * floor)
    ok = (served or model.device.type != "cuda") and rel < tol
    log(f"  fused kernel on every layer: {served}; logits rel. diff fused vs torch spectral {rel:.2e}; "
        f"noise floor (reconstruct vs spectral) {floor:.2e}; tol max(2e-2, 1.5 x floor) = {tol:.2e}: "
        f"{'OK' if ok else 'FAIL'}")
    if len(outs) == 4:
        rel_c = ((outs[3][0] - outs[0][0]).norm() / outs[0][0].norm()).item()
        served_c = all(s.kernel_calls == 1 for s in (layer.strategy for layer in outs[3][1].spectral_layers))
        good = rel_c < 1e-2 and served_c
        ok &= good
        log(f"  compiled fused vs eager fused: logits rel. diff {rel_c:.2e}, kernel on every layer {served_c}: "
            f"{'OK' if good else 'FAIL'}")
    return ok


def run(device, smoke, log):
    """Correctness, then tokens/s per (batch, ctx) and the max batch x context that fits.

    Returns (ok, rows) with rows (method, batch, ctx, tokens/s or None, cache GB).
    """
    ok = lossless_check(device, torch.float32, log)
    if smoke:
        cfg, dtype, steps = mistral_config(layers=2, tiny=True), torch.float32, 3
        skcfg = SpectralConfig.preset("fast", block_size=32, k_rank_keys=4, k_rank_values=8, hot_buffer_size=8, sink_tokens=2,
                                      attention="fused", verbose=False)
        points = {"dynamic+sdpa": [(2, 200)], "spectral+fused": [(2, 200), (4, 200)]}
    else:
        cfg, dtype, steps = mistral_config(layers=32), torch.bfloat16, 16
        skcfg = SpectralConfig.preset("fast", attention="fused", compressor="triton_rsvd", verbose=False)
        # KV bytes > weight bytes (14.5 GB) from 4 x 32K on; 32 x 32K does not fit as DynamicCache.
        points = {"dynamic+sdpa": [(4, 32768), (8, 32768)],
                  "spectral+fused": [(4, 32768), (8, 32768), (32, 32768)],
                  # SpectralConfig(compile=True): the decode attend under torch.compile (fullgraph, dynamic)
                  "spectral+fused+compile": [(8, 32768)]}
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype)
    wbytes = weight_bytes(model)
    log(f"  model: Mistral-7B shape x {cfg.num_hidden_layers} layers (random {str(dtype)[6:]} weights, "
        f"{wbytes / 1e9:.2f} GB), built in {time.perf_counter() - t0:.1f} s")
    model.config._attn_implementation = "spectral_kv"
    ok &= fused_kernel_check(model, skcfg, log)
    rows, per_token, reserve = [], {}, {}
    cuda = device == "cuda"
    for method, pts in points.items():
        for batch, ctx in pts:
            cache = None
            try:
                if method.startswith("dynamic"):
                    model.config._attn_implementation = "sdpa"
                    cache = fill_dynamic(model, batch, ctx)
                else:
                    model.config._attn_implementation = "spectral_kv"
                    cache = fill_spectral(model, skcfg.replace(compile=method.endswith("compile")), batch, ctx)
                nbytes = cache_bytes(cache)
                per_token[method] = nbytes / (batch * ctx)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                tps = decode_tokens_per_s(model, cache, batch, steps)
            except torch.cuda.OutOfMemoryError:
                log(f"  {method:15s} B={batch:3d} ctx={ctx:6d}: out of memory")
                del cache
                torch.cuda.empty_cache()
                continue
            if cuda:
                reserve[method] = max(reserve.get(method, 0), torch.cuda.max_memory_allocated() - wbytes - nbytes)
            if method.startswith("spectral"):
                strategies = [layer.strategy for layer in cache.spectral_layers]
                if cuda and any(s.fallback_calls for s in strategies):
                    ok = False
                    log("  FAIL: the fused strategy fell back to torch during the timed decode")
            rows.append((method, batch, ctx, tps, nbytes / 1e9))
            log(f"  {method:15s} B={batch:3d} ctx={ctx:6d}: {tps:9.1f} tokens/s, cache {nbytes / 1e9:6.2f} GB "
                f"(KV/weights {nbytes / wbytes:5.2f})")
            del cache
            if cuda:
                torch.cuda.empty_cache()
    if cuda and all(m in per_token and m in reserve for m in ("dynamic+sdpa", "spectral+fused")):
        total = torch.cuda.get_device_properties(0).total_memory
        fits = {m: (total - wbytes - reserve[m]) / per_token[m] for m in per_token}
        for m, n in fits.items():
            log(f"  max batch x context that fits ({m}): {n / 1e6:.2f} M tokens "
                f"({per_token[m] / 1e3:.1f} KB/token measured, activation reserve {reserve[m] / 1e9:.2f} GB)")
        log(f"  fit ratio spectral/dynamic: {fits['spectral+fused'] / fits['dynamic+sdpa']:.2f}x")
    del model
    return ok, rows
