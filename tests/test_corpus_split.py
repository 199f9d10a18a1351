"""The tuning / validation split of the evaluation corpus."""

import os
import platform

import pytest
import torch

from spectral_kv.eval.corpus import REFERENCE_RENDERING, haystack_range, load_corpus, quality_offsets, rendering_note
from spectral_kv.eval.tiny import ByteTokenizer
from spectral_kv.text import CORPUS_MODULES, SPLITS, split_sources


def test_splits_use_disjoint_modules_and_both_kinds_of_text():
    used = [m for s in SPLITS.values() for kind in ("pydoc", "source") for m in s[kind]]
    assert len(used) == len(set(used))  # no module twice: not in two splits, not as prose and as code
    assert set(SPLITS["tuning"]["pydoc"]) | set(SPLITS["validation"]["pydoc"]) == set(CORPUS_MODULES)
    for split in SPLITS:
        kinds = [(kind, len(text)) for kind, text, _ in split_sources(split)]
        assert [k for k, _ in kinds] == ["pydoc", "source"] and all(n > 100_000 for _, n in kinds)
    tune = {line for _, text, _ in split_sources("tuning") for line in map(str.strip, text.splitlines()) if len(line) > 60}
    val = {line for _, text, _ in split_sources("validation") for line in map(str.strip, text.splitlines()) if len(line) > 60}
    # only pydoc boilerplate ("Initialize self.  See help(type(self))...", inherited builtins docs) repeats
    assert len(tune & val) < 0.03 * len(val)


def test_segments_and_haystacks_stay_inside_their_sources():
    ids, info = load_corpus(ByteTokenizer(), "validation")
    assert info["split"] == "validation" and ids.dtype == torch.long and ids.numel() == info["n_tokens"]
    srcs = info["sources"]
    assert srcs[0]["start"] == 0 and srcs[0]["end"] == srcs[1]["start"] and srcs[1]["end"] == ids.numel()
    length = 4096
    offsets = quality_offsets(info, 5, length)
    kinds = [next(s["kind"] for s in srcs if s["start"] <= o < s["end"]) for o in offsets]
    assert kinds == ["pydoc", "source", "pydoc", "source", "pydoc"]
    h0, h1 = haystack_range(info)
    for o, kind in zip(offsets, kinds):
        src = next(s for s in srcs if s["kind"] == kind)
        assert src["start"] <= o and o + length <= src["start"] + 0.7 * (src["end"] - src["start"]) + 1
        assert o + length <= h0 or o >= h1  # perplexity text never doubles as a haystack
    assert srcs[0]["start"] < h0 < h1 == srcs[0]["end"]


def test_the_shipped_text_is_the_readmes_and_live_rendering_is_explicit():
    # the frozen text (the default) is the rendering the README's numbers read, on every machine
    _, info = load_corpus(ByteTokenizer(), "validation")
    ref_python, ref_hashes = REFERENCE_RENDERING["validation"]
    assert info["rendering"] == "frozen" and info["python"] == ref_python
    assert [s["sha256"] for s in info["sources"]] == list(ref_hashes) and rendering_note(info) is None
    # the live one is this Python's; same modules, same kinds, in the same order
    live = split_sources("validation", "live")
    assert [(k, m) for k, _, m in live] == [(k, m) for k, _, m in split_sources("validation")]
    _, info_live = load_corpus(ByteTokenizer(), "validation", rendering="live")
    assert info_live["rendering"] == "live" and info_live["python"] == platform.python_version()
    with pytest.raises(ValueError, match="rendering"):
        split_sources("validation", "cached")


def test_a_stale_frozen_file_is_refused(tmp_path, monkeypatch):
    import spectral_kv.text as text

    monkeypatch.setattr(text, "FROZEN_DIR", str(tmp_path))
    text._frozen.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="live"):
            text.split_sources("tuning")
        paths = text.freeze(str(tmp_path))
        assert sorted(os.path.basename(p) for p in paths) == ["tuning.json.xz", "validation.json.xz"]
        assert text.split_sources("tuning") == text.split_sources("tuning", "live")
        monkeypatch.setitem(text.SPLITS, "tuning", dict(text.SPLITS["tuning"], source=("queue",)))
        text._frozen.cache_clear()
        with pytest.raises(ValueError, match="re-freeze"):
            text.split_sources("tuning")
    finally:
        text._frozen.cache_clear()


def test_a_rendering_other_than_the_readmes_is_said():
    # the text comes from the running Python's stdlib: a different rendering gets a note, the
    # reference one (its hashes) none, and a split without a reference none
    _, info = load_corpus(ByteTokenizer(), "validation")
    ref_python, ref_hashes = REFERENCE_RENDERING["validation"]
    same = dict(info, sources=[dict(s, sha256=h) for s, h in zip(info["sources"], ref_hashes)])
    assert rendering_note(same) is None
    other = dict(info, sources=[dict(s, sha256="0" * 64) for s in info["sources"]], python="3.0.0")
    note = rendering_note(other)
    assert note and "3.0.0" in note and ref_python in note and "validation" in note
    assert rendering_note(dict(other, split="tuning")) is None
