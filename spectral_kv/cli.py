"""`spectral-kv demo | memory | eval`: the command line."""

from __future__ import annotations

import argparse
import sys
import time

from .presets import PRESETS

__all__ = ["main", "build_prompt"]

NEEDLE = "Note to the reader: the archive password is {secret}. Remember it."
QUESTION = "What is the archive password mentioned in the text above? Answer with the password only."
SECRET = "amber-falcon-7412"


def build_prompt(tokenizer, context_tokens: int, needle_at: int = 300):
    """A chat prompt of ~``context_tokens`` tokens of stdlib documentation with a password
    placed ``needle_at`` tokens in, and a question about it at the end. Returns input ids [1, L]."""
    import torch

    from .text import stdlib_tokens

    filler = stdlib_tokens(tokenizer, context_tokens)
    text = (
        tokenizer.decode(filler[:needle_at])
        + "\n\n"
        + NEEDLE.format(secret=SECRET)
        + "\n\n"
        + tokenizer.decode(filler[needle_at:])
    )
    messages = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):  # transformers >= 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return ids


def _generate(model, ids, max_new_tokens, desc, **kwargs):
    import torch
    from tqdm.auto import tqdm
    from transformers import StoppingCriteria

    bar = tqdm(total=max_new_tokens, desc=desc, unit="tok", leave=False)

    class Progress(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            bar.update(1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=[Progress()],
            **kwargs,
        )
    seconds = time.perf_counter() - start
    bar.close()
    return out[0, ids.shape[1] :], seconds


def _config(args, verbose: bool):
    from . import SpectralConfig

    extra = {} if args.sink_tokens is None else {"sink_tokens": args.sink_tokens}
    return SpectralConfig.preset(args.preset, verbose=verbose, **extra)


def cmd_demo(args) -> int:
    import torch

    from . import SpectralConfig, patch_unsloth_attention
    from .models import ModelPackageMissing, load_default_model

    torch.manual_seed(0)
    print("spectral_kv demo: SmolLM2-135M-Instruct (embedded GGUF) on", "cpu")
    try:
        model, tok = load_default_model(progress=True)
    except ModelPackageMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = build_prompt(tok, args.context)
    print(f"prompt: {ids.shape[1]} tokens of Python stdlib documentation; password placed near the start")

    from transformers import DynamicCache

    exact, t_exact = _generate(model, ids, args.max_new_tokens, "exact cache", past_key_values=DynamicCache())
    config = _config(args, verbose=True)
    patch = patch_unsloth_attention(model, config=config)
    try:
        spectral, t_spec = _generate(model, ids, args.max_new_tokens, "spectral cache")
        report = patch.memory_report()
    finally:
        patch.unpatch()

    def answer(tokens):
        return tok.decode(tokens, skip_special_tokens=True).strip()

    n = min(len(exact), len(spectral))
    same = int((exact[:n] == spectral[:n]).sum())
    first_diff = next((i for i in range(n) if exact[i] != spectral[i]), None)
    print()
    print(f"exact    answer: {answer(exact)!r}")
    print(f"spectral answer: {answer(spectral)!r}")
    print(f"password {SECRET!r} found: exact={SECRET in answer(exact)} spectral={SECRET in answer(spectral)}")
    print(
        f"token agreement: {same}/{n} generated positions identical"
        + ("" if first_diff is None else f" (first difference at token {first_diff})")
    )
    mb = 2**20
    print()
    print(f"KV cache after generation ({report['tokens'] // max(1, len(report['per_layer']))} tokens per layer, all 30 layers, float32 model):")
    print(f"  {'tier':<12}{'MB':>10}")
    for key in ("cold_keys", "cold_values", "sinks", "warm", "hot"):
        print(f"  {key:<12}{report[key] / mb:>10.2f}")
    print(f"  {'total':<12}{report['total_bytes'] / mb:>10.2f}")
    print(f"  {'exact cache':<12}{report['dense_bytes'] / mb:>10.2f}   ratio {report['ratio']:.2f}x")
    print()
    print(
        f"speed (CPU, prefill + {args.max_new_tokens} new tokens, greedy): exact {len(exact) / t_exact:.2f} tok/s, "
        f"spectral {len(spectral) / t_spec:.2f} tok/s (torch reference strategy; the fused kernel is GPU-only)"
    )
    if not args.no_table:
        from .memory import SHAPES, format_table, measure_memory

        print()
        print("memory table (fp16 caches filled with real tensors; `spectral-kv memory` for more):")
        print(format_table(SHAPES["smollm2"], measure_memory(SHAPES["smollm2"], (1024, 4096, 8192), config.replace(verbose=False))))
    return 0


def cmd_memory(args) -> int:
    from . import SpectralConfig
    from .memory import SHAPES, format_table, measure_memory

    config = _config(args, verbose=False)
    print(f"preset {args.preset}: {config.summary()}\n")
    for name in args.model:
        shape = SHAPES[name]
        print(format_table(shape, measure_memory(shape, tuple(args.contexts), config)))
        print()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spectral-kv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="exact vs spectral cache on the embedded SmolLM2, long prompt")
    demo.add_argument("--context", type=int, default=3300, help="tokens of documentation in the prompt")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--sink-tokens", type=int, default=None, help="override the preset's sink tokens")
    demo.add_argument("--preset", default="balanced", choices=sorted(PRESETS), help="compression preset (default: balanced)")
    demo.add_argument("--no-table", action="store_true", help="skip the memory table")
    demo.set_defaults(func=cmd_demo)

    mem = sub.add_parser("memory", help="memory table of a preset (default balanced), measured from the tensors held")
    mem.add_argument("--model", nargs="+", choices=["smollm2", "mistral-7b"], default=["smollm2", "mistral-7b"])
    mem.add_argument("--contexts", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    mem.add_argument("--sink-tokens", type=int, default=None, help="override the preset's sink tokens")
    mem.add_argument("--preset", default="balanced", choices=sorted(PRESETS), help="compression preset (default: balanced)")
    mem.set_defaults(func=cmd_memory)

    try:
        from .eval.run import add_eval_arguments, run_eval
    except ImportError:
        pass
    else:
        ev = sub.add_parser("eval", help="quality and memory against baselines (see README)")
        add_eval_arguments(ev)
        ev.set_defaults(func=run_eval)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
