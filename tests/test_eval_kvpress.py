"""kvpress methods: chunked teacher forcing after eviction, and a missing / incompatible kvpress."""

import argparse
import importlib.metadata as md
import json
import sys

import pytest
import torch

from conftest import method_or_skip

from spectral_kv.eval import make_method
from spectral_kv.eval.methods import presses as methods_mod
from spectral_kv.eval.perplexity import run_segment
from spectral_kv.eval.tiny import tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(seed=0)


@pytest.mark.parametrize("spec", ["snapkv:ratio=0.5", "kvpress:press=streaming,ratio=0.5"])
def test_eviction_chunked_equals_token_by_token(tiny, spec):
    """After eviction the cache is shorter than the sequence; chunks must still be causal."""
    model, _ = tiny
    method = method_or_skip(spec)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (220,), generator=g)
    one = run_segment(model, method, ids[:200], ids[200:], chunk=1)
    chunked = run_segment(model, method, ids[:200], ids[200:], chunk=8)
    assert one.bytes_after_prefill["ratio_vs_fp16"] == pytest.approx(2.0, rel=0.02)
    assert torch.allclose(one.logits, chunked.logits, atol=1e-4), (one.logits - chunked.logits).abs().max()


def test_kvpress_spec_errors():
    with pytest.raises(ValueError, match="press='nope'"):
        make_method("kvpress:press=nope")
    method_or_skip("snapkv:ratio=0.5")
    with pytest.raises(ValueError, match="ratio=1.5"):
        make_method("snapkv:ratio=1.5")


def test_incompatible_kvpress_names_the_conflict(monkeypatch):
    """kvpress pinning another transformers (e.g. transformers 5.17): a clear ImportError."""
    monkeypatch.delitem(sys.modules, "kvpress", raising=False)
    real_version, real_requires = md.version, md.requires
    monkeypatch.setattr(
        md, "requires", lambda name: ["transformers<5.3,>=4.56.0", "torch"] if name == "kvpress" else real_requires(name)
    )
    monkeypatch.setattr(md, "version", lambda name: {"kvpress": "0.5.5", "transformers": "5.17.0"}.get(name) or real_version(name))
    with pytest.raises(ImportError, match=r"kvpress 0.5.5 requires transformers<5.3,>=4.56.0, found transformers 5.17.0"):
        make_method("snapkv:ratio=0.5")
    assert "kvpress" not in sys.modules  # never imported


def test_missing_or_broken_kvpress(monkeypatch):
    monkeypatch.delitem(sys.modules, "kvpress", raising=False)
    real_version = md.version

    def no_kvpress(name):
        if name == "kvpress":
            raise md.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(md, "version", no_kvpress)
    with pytest.raises(ImportError, match="not installed.*transformers<5.3"):
        make_method("knorm")
    # installed and declared compatible, but the import itself fails
    monkeypatch.setattr(methods_mod, "check_kvpress_compat", lambda: None)
    monkeypatch.setattr("builtins.__import__", _failing_import(__import__, "kvpress"))
    with pytest.raises(ImportError, match="importing kvpress failed with transformers .*RuntimeError: boom"):
        make_method("streaming")


def _failing_import(real, blocked):
    def imp(name, *args, **kwargs):
        if name == blocked:
            raise RuntimeError("boom")
        return real(name, *args, **kwargs)

    return imp


def test_run_eval_skips_kvpress_and_runs_the_rest(tmp_path, monkeypatch):
    from spectral_kv.eval.run import add_eval_arguments, run_eval

    def incompatible():
        raise ImportError("kvpress 0.5.5 requires transformers<5.3, found transformers 5.17.0")

    monkeypatch.delitem(sys.modules, "kvpress", raising=False)
    monkeypatch.setattr(methods_mod, "check_kvpress_compat", incompatible)
    args = add_eval_arguments(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny-random", "--out", str(tmp_path), "--tag", "nokv", "--segments", "1", "--no-niah",
         "--methods", "exact;snapkv:ratio=0.5;kivi4:block=64,hot=16"]
    )
    assert run_eval(args) == 0
    res = json.loads((tmp_path / "nokv.json").read_text())
    assert res["methods_run"] == ["exact", "kivi4:block=64,hot=16"]
    assert "requires transformers<5.3" in res["methods_skipped"]["snapkv:ratio=0.5"]
    assert res["quality"]["methods"]["kivi4:block=64,hot=16"]["summary"]["ratio_vs_fp16_after_prefill"]["mean"] > 1.2
