"""`spectral-kv demo | memory | eval | bench | generate | calibrate`: the command line."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESETS

__all__ = ["main"]


def _config(args, verbose: bool):
    from . import SpectralConfig

    extra = {} if getattr(args, "sink_tokens", None) is None else {"sink_tokens": args.sink_tokens}
    return SpectralConfig.preset(args.preset, verbose=verbose, **extra)


def _add_model_arguments(p: argparse.ArgumentParser, default: str | None = "smollm2") -> None:
    """``--model PATH_OR_ID [--gguf FILE] [--dtype] [--device]``; options the parser already
    has (the eval harness defines its own ``--model`` and may define ``--device``) are kept."""
    have = p._option_string_actions  # argparse keeps no public registry of defined options
    specs = {
        "--model": dict(default=default, help="'smollm2' (embedded), a model directory, a .gguf file or a hub id"),
        "--gguf": dict(default=None, help="GGUF file inside --model's directory (or a path to one)"),
        "--dtype": dict(default=None, choices=["auto", "float32", "float16", "bfloat16"],
                        help="default: float32 on the CPU, the checkpoint's dtype on CUDA"),
        "--device": dict(default=None, help="cpu (default), cuda or cuda:N"),
    }
    for flag, kw in specs.items():
        if flag not in have:
            p.add_argument(flag, **kw)


def _load(args):
    from .models import load_model

    return load_model(args.model, gguf=args.gguf, dtype=args.dtype, device=args.device, progress=True)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_memory(args) -> int:
    from .memory import SHAPES, format_table, measure_memory

    config = _config(args, verbose=False)
    print(f"preset {args.preset}: {config.summary()}\n")
    for name in args.model:
        shape = SHAPES[name]
        print(format_table(shape, measure_memory(shape, tuple(args.contexts), config)))
        print()
    return 0


def cmd_bench(args) -> int:
    from .bench import format_rows, run_bench

    model, _ = _load(args)
    tag = args.tag or f"bench-{model.device.type}-b{args.batch}-c{args.context}"
    result = run_bench(model, args.preset, args.batch, args.context, args.new_tokens, args.out, tag, args.model)
    print(f"{args.model} on {result['device_name']} ({result['dtype']}), batch {args.batch}, context {args.context}, "
          f"{args.new_tokens} new tokens")
    print(format_rows(result))
    print("wrote " + ", ".join(result["files"]))
    return 0


def cmd_generate(args) -> int:
    import torch

    from . import patch_unsloth_attention
    from .bench import timed_generate
    from .models import check_servable

    model, tok = _load(args)
    config = _config(args, verbose=False)
    check_servable(model, config)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompt-file {args.prompt_file!r} does not exist") from None
        ids = tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
    else:  # the original design's example: a synthetic long context of the requested length
        from .text import stdlib_tokens

        ids = torch.tensor([stdlib_tokens(tok, args.context_length)])
    if args.chat:
        messages = [{"role": "user", "content": tok.decode(ids[0], skip_special_tokens=True)}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    ids = ids.to(model.device)
    print(f"prompt: {ids.shape[1]} tokens; preset {args.preset}: {config.summary()}", file=sys.stderr)
    patch = patch_unsloth_attention(model, config=config, verbose=False)
    try:
        out, seconds, ms = timed_generate(model, ids, args.max_new_tokens, "generating", exact_length=False)
        report = patch.memory_report()
    finally:
        patch.unpatch()
    print(tok.decode(out[0], skip_special_tokens=True))
    print(
        f"\n{out.shape[1]} tokens in {seconds:.1f}s (decode {ms or float('nan'):.1f} ms/token); KV cache "
        f"{report['total_bytes'] / 2**20:.2f} MB vs {report['dense_bytes'] / 2**20:.2f} MB exact "
        f"({report['ratio']:.2f}x)",
        file=sys.stderr,
    )
    return 0


# The layouts of the measured SmolLM2 mix (results/TUNING_NOTES.md, "Per-layer budgets"): K4/V3 and K3/V2,
# byte value statistics, 256-token key groups, hot 256.
CALIBRATE_HI = "balanced:value_stats=byte,quant_group=256,hot_buffer_size=256"
CALIBRATE_LO = "max-compression:value_stats=byte,quant_group=256,hot_buffer_size=256"


def cmd_calibrate(args) -> int:
    import torch

    from .calibrate import calibrate_layers, layout_changes, resolve_layout
    from .eval.corpus import load_corpus, quality_offsets

    layout_changes(resolve_layout(args.hi, "--hi"), resolve_layout(args.lo, "--lo"))  # before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.split == "validation":
        print("spectral-kv calibrate: note: calibrating on the validation split makes its quality numbers "
              "in-sample", file=sys.stderr)
    model, tok = _load(args)
    ids, info = load_corpus(tok, args.split)
    # The eval harness's segments (dealt over the split's sources), so a calibration and an eval of the
    # same split and sizes read the same windows.
    offsets = quality_offsets(info, args.segments, args.context + args.continuation)
    result = calibrate_layers(model, tok, ids, hi=args.hi, lo=args.lo, target_ratio=args.target_ratio,
                              group=args.group, context=args.context, continuation=args.continuation,
                              chunk=args.chunk, segments=args.segments, offsets=offsets, cost=args.cost)
    result.settings.update(model=args.model, split=args.split, hi=args.hi, lo=args.lo)
    result.save(args.out)
    print(result.summary())
    print(f"wrote {args.out} ({result.settings['seconds']:.0f}s); load it with "
          "spectral_kv.calibrate.CalibrationResult.load(path).config")
    return 0


def _errors_to_exit(func):
    """Errors a user can fix (a bad path, a model the layout cannot serve) as one line, exit 2."""

    def run(args):
        try:
            return func(args)
        except (FileNotFoundError, OSError, ValueError) as exc:
            print(f"spectral-kv {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectral-kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a retrieval question answered with the exact and the spectral cache")
    demo.add_argument("--context", type=int, default=3500, help="prompt tokens (needle-in-a-haystack format)")
    demo.add_argument("--depth", type=float, default=0.3, help="where the secret sits in the haystack, in [0, 1]")
    demo.add_argument("--offset", type=int, default=20000, help="first corpus token of the haystack")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--preset", default="balanced", choices=sorted(PRESETS), help="compression preset (default: balanced)")
    _add_model_arguments(demo)
    demo.set_defaults(func=_errors_to_exit(cmd_demo))

    mem = sub.add_parser("memory", help="memory table of a preset (default balanced), measured from the tensors held")
    mem.add_argument("--model", nargs="+", choices=["smollm2", "mistral-7b"], default=["smollm2", "mistral-7b"])
    mem.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    mem.add_argument("--sink-tokens", type=int, default=None, help="override the preset's sink tokens")
    mem.add_argument("--preset", default="balanced", choices=sorted(PRESETS), help="compression preset (default: balanced)")
    mem.set_defaults(func=cmd_memory)

    bench = sub.add_parser("bench", help="decode ms/token and memory: DynamicCache, static+compile (CUDA), presets")
    _add_model_arguments(bench)
    bench.add_argument("--preset", nargs="+", default=["balanced"], choices=sorted(PRESETS))
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--context", type=int, default=4096, help="prompt tokens (random ids)")
    bench.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    bench.add_argument("--out", default="results", help="directory for the JSON and PNG")
    bench.add_argument("--tag", default=None, help="file stem (default bench-<device>-b<batch>-c<context>)")
    bench.set_defaults(func=_errors_to_exit(cmd_bench))

    gen = sub.add_parser("generate", help="generate from a prompt file through the spectral cache")
    _add_model_arguments(gen)
    gen.add_argument("--prompt-file", default=None, help="text file (default: --context-length tokens of stdlib docs)")
    gen.add_argument("--context-length", type=int, default=8192, help="synthetic prompt length without --prompt-file")
    gen.add_argument("--max-new-tokens", type=int, default=1000)
    gen.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    gen.add_argument("--sink-tokens", type=int, default=None, help="override the preset's sink tokens")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.set_defaults(func=_errors_to_exit(cmd_generate))

    cal = sub.add_parser("calibrate", help="per-layer layouts for a target cold ratio, measured on tuning text")
    _add_model_arguments(cal)
    cal.add_argument("--target-ratio", type=float, default=5.0, help="cold-storage ratio to reach (default 5)")
    cal.add_argument("--out", required=True, help="JSON file for the result (its 'config' loads as SpectralConfig(**d))")
    cal.add_argument("--split", choices=("tuning", "validation"), default="tuning",
                     help="corpus split to measure on (default tuning; validation makes its numbers in-sample)")
    cal.add_argument("--hi", default=CALIBRATE_HI, help=f"the better layout, 'preset:field=value,...' (default {CALIBRATE_HI})")
    cal.add_argument("--lo", default=CALIBRATE_LO, help=f"the cheaper layout (default {CALIBRATE_LO})")
    cal.add_argument("--group", type=int, default=3, help="consecutive layers measured together (default 3)")
    cal.add_argument("--cost", choices=("top1", "kl"), default="top1",
                     help="a group's cost: drop of top-1 agreement vs exact (default) or rise of next-token KL")
    cal.add_argument("--segments", type=int, default=3)
    cal.add_argument("--context", type=int, default=3584, help="tokens prefilled per segment")
    cal.add_argument("--continuation", type=int, default=512, help="tokens teacher-forced per segment")
    cal.add_argument("--chunk", type=int, default=64, help="tokens per teacher-forced forward")
    cal.add_argument("--threads", type=int, default=None)
    cal.set_defaults(func=_errors_to_exit(cmd_calibrate))

    try:
        from .eval.run import add_eval_arguments, run_eval
    except ImportError:
        pass
    else:
        ev = sub.add_parser("eval", help="quality and memory against baselines (see README)")
        add_eval_arguments(ev)
        _add_model_arguments(ev)
        ev.set_defaults(func=_errors_to_exit(run_eval))

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
