"""The harness end-to-end on a tiny random model, and each baseline adapter's bytes."""

import argparse
import json

import pytest
import torch

from conftest import method_or_skip

from spectral_kv.eval import make_method
from spectral_kv.eval.bytes import cache_bytes, count_bytes
from spectral_kv.eval.methods import parse_spec
from spectral_kv.eval.perplexity import run_segment
from spectral_kv.eval.tiny import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(seed=0)


def test_parse_spec():
    assert parse_spec("spectral:sink=0,k=8") == ("spectral", {"sink": "0", "k": "8"})
    with pytest.raises(ValueError):
        make_method("spectral:nonsense=1")
    with pytest.raises(ValueError):
        make_method("no-such-method")


def test_count_bytes_dedupes_and_halves_float32():
    a = torch.zeros(10, dtype=torch.float32)
    b = torch.zeros(8, dtype=torch.uint8)
    assert count_bytes([a, a, b]) == {"held_bytes": 48, "fp16_bytes": 28}


def test_exact_vs_exact_is_identical(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (120,))
    m = make_method("exact")
    r1 = run_segment(model, m, ids[:100], ids[100:], chunk=5)
    r2 = run_segment(model, m, ids[:100], ids[100:], chunk=1)
    from spectral_kv import metrics as M

    assert M.ppl_delta(r1.logits, r1.logits, ids[100:])["delta"] == 0
    # chunked and token-by-token teacher forcing agree (float noise only)
    assert torch.allclose(r1.logits, r2.logits, atol=1e-4)
    assert r1.bytes_end["ratio_vs_fp16"] == pytest.approx(1.0)


def test_a_segment_seeded_with_the_exact_prefill_equals_a_prefilled_one(tiny):
    model, _ = tiny
    ids = torch.randint(0, 256, (130,), generator=torch.Generator().manual_seed(3))
    exact, method = make_method("exact"), make_method("spectral:block=32,hot=8,bits=3,vbits=2")
    kv = []
    ref = run_segment(model, exact, ids[:100], ids[100:], chunk=8,
                      on_prefill=lambda c: kv.extend((c.layers[i].keys.clone(), c.layers[i].values.clone())
                                                     for i in range(len(c.layers))))
    first = ref.logits[:1].clone()
    first[0, 0] += 1.0  # marks the seed's row: it must come back as row 0, not a new prefill's
    method.setup(model)
    try:
        seeded = run_segment(model, method, ids[:100], ids[100:], chunk=8, seed=(kv, first))
        prefilled = run_segment(model, method, ids[:100], ids[100:], chunk=8)
    finally:
        method.teardown(model)
    assert torch.equal(seeded.logits[0], first[0])
    assert seeded.bytes_end == prefilled.bytes_end
    # float noise of the prefill only (it may move a 2-bit code by one step), far below the compression error
    noise = (seeded.logits[1:] - prefilled.logits[1:]).abs().max()
    assert noise < 0.1 * (prefilled.logits[1:] - ref.logits[1:]).abs().max()
    with pytest.raises(ValueError, match="cannot start from a seed"):
        run_segment(model, method_or_skip("snapkv:ratio=0.5"), ids[:100], ids[100:], chunk=8, seed=(kv, ref.logits[:1]))


ADAPTERS = [
    "spectral:block=64,hot=16,preset=fast,k=8,v=16",
    "kivi4:block=64,hot=16",
    "kivi2:block=64,hot=16",
    "hqq:bits=4,group=32,residual=16",
    "hqq:bits=2,group=32,residual=16",
    "snapkv:ratio=0.5",
    "streaming:ratio=0.5",
    "knorm:ratio=0.5",
    pytest.param("quanto:bits=4,group=32,residual=16", marks=pytest.mark.slow),  # builds a C++ extension once
]


@pytest.mark.parametrize("spec", ADAPTERS)
def test_adapter_round_trip_holds_fewer_bytes(tiny, spec):
    model, _ = tiny
    method = method_or_skip(spec)
    ids = torch.randint(0, 256, (330,))
    method.setup(model)
    try:
        run = run_segment(model, method, ids[:300], ids[300:], chunk=10)
    finally:
        method.teardown(model)
    assert model.config._attn_implementation == "sdpa"  # unpatched
    assert torch.isfinite(run.logits).all() and run.logits.shape == (30, 256)
    # measured from the tensors held, fp16-equivalent: really fewer bytes than fp16
    assert run.bytes_after_prefill["fp16_bytes"] < run.bytes_after_prefill["dense_fp16_bytes"]
    assert run.bytes_after_prefill["ratio_vs_fp16"] > 1.2


def test_spectral_bytes_match_library_report(tiny):
    model, _ = tiny
    method = make_method("spectral:block=64,hot=16,preset=fast,k=8,v=16")
    method.setup(model)
    try:
        cache = method.new_cache(model)
        with torch.inference_mode():
            model(torch.randint(0, 256, (1, 200)), past_key_values=cache)
        measured = cache_bytes(cache, 200, 2, 32)
        assert measured["held_bytes"] == cache.memory_report()["total_bytes"]
    finally:
        method.teardown(model)


def test_harness_end_to_end(tmp_path):
    from spectral_kv.eval.run import add_eval_arguments, run_eval

    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny-random", "--out", str(tmp_path), "--tag", "ci",
         "--methods", "exact;spectral:block=64,hot=16,preset=fast,k=8,v=16;kivi2:block=64,hot=16"]
    )
    assert run_eval(args) == 0
    res = json.loads((tmp_path / "ci.json").read_text())
    assert res["split"] == res["corpus"]["split"] == res["quality"]["split"] == "validation" and res["versions"]["torch"]
    assert [s["kind"] for s in res["corpus"]["sources"]] == ["pydoc", "source"]
    assert res["quality"]["segment_sources"] == ["pydoc", "source"]  # one segment of each kind of text
    q = res["quality"]["methods"]
    assert q["exact"]["summary"]["delta"]["mean"] == 0.0
    assert q["exact"]["summary"]["top1_agreement"]["mean"] == 1.0
    assert q["exact"]["summary"]["fidelity_mean_score_corr"]["mean"] == pytest.approx(1.0)
    for spec in res["methods_run"]:
        segs = q[spec]["per_segment"]
        assert len(segs) == 2 and all("bytes_end" in s and s["fidelity_per_layer"] for s in segs)
    assert q["kivi2:block=64,hot=16"]["summary"]["ratio_vs_fp16_after_prefill"]["mean"] > 1.2
    assert set(res["niah"]["methods"]) == set(res["methods_run"])
    assert (tmp_path / "README_table.md").read_text().count("| ci |") == 3
    assert (tmp_path / "ci_frontier.png").exists() and (tmp_path / "ci_niah.png").exists()
    assert (tmp_path / "ci_niah_kivi2-block-64-hot-16.png").exists()  # one heatmap per method too
    assert set(res["seconds"]) == {"model_load", "corpus", "quality", "niah"}
    assert f"- `ci`: {res['seconds_total']:.0f} s on" in (tmp_path / "README_table.md").read_text()


def test_quick_preset_exercises_every_measurement():
    """--quick stays small but still compresses a block, probes fidelity and runs NIAH."""
    from spectral_kv import SpectralConfig
    from spectral_kv.eval.methods import QUICK_METHODS
    from spectral_kv.eval.run import _resolve

    args = add_eval_arguments_parse(["--quick"])
    cfg = _resolve(args)
    d = SpectralConfig()
    assert cfg["context"] >= d.sink_tokens + d.hot_buffer_size + d.block_size  # >= 1 cold block after prefill
    assert cfg["segments"] == 1 and cfg["continuation"] > cfg["chunk"] >= args.fidelity_queries
    assert cfg["niah_lengths"] and cfg["niah_depths"]
    assert {"exact", "spectral"} <= set(QUICK_METHODS) and len(QUICK_METHODS) >= 3  # + a baseline


def add_eval_arguments_parse(argv):
    from spectral_kv.eval.run import add_eval_arguments

    return add_eval_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_spectral_spec_presets_and_options():
    orig = make_method("spectral:preset=original").describe()["settings"]
    assert (orig["compressor"], orig["sink_tokens"], orig["coeff_bits"]) == ("exact_svd", 0, 8)
    from spectral_kv import SpectralConfig

    default = make_method("spectral").describe()["settings"]
    assert default["compressor"] == SpectralConfig().compressor and default["preset"] == "default"
    assert make_method("spectral:preset=fast,sink=0").describe()["settings"]["sink_tokens"] == 0
    with pytest.raises(ValueError, match="nope"):
        make_method("spectral:preset=nope")
    with pytest.raises(ValueError, match="k='abc'"):
        make_method("spectral:k=abc")
