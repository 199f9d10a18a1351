"""patch_unsloth_attention against Unsloth's real CUDA fast path (run on a GPU machine).

For a tiny random Llama, Qwen3 and Mistral saved to local directories and loaded through the real
``FastLanguageModel.from_pretrained`` + ``for_inference``:
1. the fast path runs unpatched (its ``paged_attention`` buffers appear) -> reference tokens/scores;
2. patched at lossless settings: no paged buffers come back, the SpectralCache holds every token
   and the spectral attention ran on every layer at every step; token equality with the fast path
   is required for float32 models (step 5) and reported for bf16 (near-ties flip there);
3. default settings over a prompt longer than one block (so cold blocks are compressed): agreement
   with the fast path's tokens;
4. unpatch(): flags, generate and attention implementation back; fast path tokens again;
5. the same models loaded in float32: lossless tokens == the fast path's, strictly.
Prints one report; exits non-zero if a check fails. No downloads: random weights built here.

    python3 tests/gpu/unsloth_gpu.py | tee tests/gpu/results_unsloth_<card>.txt

Needs unsloth + unsloth_zoo 2026.10.9 and their GPU dependencies (bitsandbytes, trl, peft, torchao,
cut_cross_entropy, datasets, tyro, ...) on the GPU machine; there they were installed from wheels
(`pip download --no-deps` for the machine's platform) with `pip install --no-deps --target`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import unsloth  # noqa: E402  (first, as Unsloth asks)
from unsloth import FastLanguageModel  # noqa: E402

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from spectral_kv.integrations.unsloth import detect_unsloth_path, patch_unsloth_attention  # noqa: E402

hf_logging.disable_progress_bar()
FAILED: list[str] = []


# Full rank, unquantized, fp32 bases: the cache is exact up to rounding.
LOSSLESS = dict(block_size=32, hot_buffer_size=4, k_rank_keys=32, k_rank_values=32, sink_tokens=1,
                compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32")


def check(ok: bool, what: str) -> None:
    print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILED.append(what)


def save_tiny(kind: str, root: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(root, kind)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(252)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    common = dict(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=2048, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:  # no sliding window, so every layer is full attention (spectral)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    model.save_pretrained(path)
    return path


def attn_modules(model):
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj")]


def run(kind: str, root: str) -> None:
    print(f"\n=== {kind} ===")
    model, _ = FastLanguageModel.from_pretrained(
        save_tiny(kind, root), max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=False, local_files_only=True
    )
    FastLanguageModel.for_inference(model)
    attn = attn_modules(model)
    print(f"  class {type(model).__name__}, attention class {type(attn[0]).__name__}, attn_impl {model.config._attn_implementation}")
    print(f"  {type(attn[0]).__name__}.forward gated: {getattr(type(attn[0]).forward, '_unsloth_gated', False)}; "
          f"generate = {model.generate.__name__}")
    path = detect_unsloth_path(model)
    check(path == "unsloth_gated", f"detected path {path!r} == 'unsloth_gated'")
    flags_before = [m.__dict__.get("_unsloth_fast_path", "absent") for m in model.modules()]
    n_true = sum(f is True for f in flags_before)
    # Not every module: some are created after mark_unsloth_fast_path (seen here on the first H100 run).
    check(n_true > 0, f"{n_true}/{len(flags_before)} modules carry _unsloth_fast_path=True after load")
    original_generate = model.generate

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, 256, (1, 40), generator=g).cuda()
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False,
              eos_token_id=None, return_dict_in_generate=True, output_scores=True)

    fast = model.generate(**kw)
    check(any("paged_attention" in a.__dict__ for a in attn), "fast path ran: paged_attention buffers on attention modules")

    patch = patch_unsloth_attention(model, verbose=True, **LOSSLESS)
    check(patch.path == "unsloth_gated", "patch took the gated path")
    check(all(m.__dict__.get("_unsloth_fast_path") is False for m in model.modules()), "flags cleared on every module")
    check(not any("paged_attention" in a.__dict__ for a in attn), f"stale buffers dropped ({patch.dropped_buffers} attributes)")
    out = model.generate(**kw)
    new = out.sequences.shape[1] - prompt.shape[1]
    calls_before_control = patch.spectral_calls
    # Control: the same model with the fast path off, an exact DynamicCache and SDPA (our attention
    # function falls through to SDPA when no SpectralCache stages tokens). It separates what
    # spectral_kv changes from what Unsloth's fast path computes differently from its own slow path.
    control = model.generate(**kw, past_key_values=DynamicCache())

    def compare(a, b):
        """(equal, max |logit diff| up to the first differing token, agreement, margin of b there)."""
        ta, tb = a.sequences[0, prompt.shape[1]:], b.sequences[0, prompt.shape[1]:]
        first = next((i for i in range(len(ta)) if ta[i] != tb[i]), len(ta))
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(a.scores[: first + 1], b.scores[: first + 1]))
        margin = None
        if first < len(ta):
            top2 = b.scores[first][0].float().topk(2).values
            margin = (top2[0] - top2[1]).item()
            print(f"    first differing token at step {first}; the reference's top-2 margin there: {margin:.3g}")
        return torch.equal(a.sequences, b.sequences), diff, (ta == tb).float().mean().item(), margin

    # Unsloth's own two exact paths (fast path vs fast path off + DynamicCache) differ by this much
    # in bf16 logits: the noise floor that any other exact-in-fp32 computation also lives within.
    same_cf, noise, agree_cf, _ = compare(control, fast)
    print(f"    [info] Unsloth slow path (exact cache) vs its fast path: equal={same_cf}, max |logit diff| {noise:.3g}, "
          f"agreement {agree_cf:.3f}")
    same, diff, agree, margin = compare(out, control)
    print(f"    [info] lossless spectral vs exact DynamicCache (fast path off): equal={same}, max |logit diff| up to "
          f"the first differing token {diff:.3g}, agreement {agree:.3f}")
    # In bf16 a near-tie (top-2 margin ~0.06-0.1 here) flips under any change of summation order,
    # so bf16 token equality is reported, not required; run_fp32 requires it where it is meaningful.
    tie = diff <= noise and margin is not None and margin <= noise
    print(f"    [info] bf16: tokens equal={same}; a rounding tie within Unsloth's own fast-vs-slow noise: {tie}")
    same, diff, agree, _ = compare(out, fast)
    print(f"    [info] lossless spectral vs Unsloth fast path: equal={same}, max |logit diff| {diff:.3g}, agreement {agree:.3f}")

    cache = patch.last_cache
    check(cache.get_seq_length() == out.sequences.shape[1] - 1, f"SpectralCache holds {cache.get_seq_length()} tokens (prompt+new-1)")
    cold = sum(sum(layer.tiers.n_cold) for layer in cache.spectral_layers)
    check(cold > 0, f"{cold} cold (compressed) blocks across layers")
    layers = model.config.num_hidden_layers
    check(calls_before_control == layers * new, f"spectral attention calls {calls_before_control} == layers*steps {layers * new}")
    check(not any("paged_attention" in a.__dict__ for a in attn), "no paged_attention buffers after the patched generate")
    patch.unpatch()

    # default settings: block 512, rank 16/32, int8 coefficients; a prompt longer than one block
    long_prompt = torch.randint(4, 256, (1, 700), generator=g).cuda()
    kw_long = dict(input_ids=long_prompt, attention_mask=torch.ones_like(long_prompt), max_new_tokens=32,
                   do_sample=False, eos_token_id=None)
    fast_long = model.generate(**kw_long)
    patch = patch_unsloth_attention(model, verbose=False)
    out_long = model.generate(**kw_long)
    agree = (out_long[0, 700:] == fast_long[0, 700:]).float().mean().item()
    rep = patch.memory_report()
    cold = sum(sum(layer.tiers.n_cold) for layer in patch.last_cache.spectral_layers)
    print(f"  default settings: {cold} cold blocks, memory ratio {rep['ratio']:.2f}x, "
          f"token agreement with the fast path {agree:.3f}, spectral calls {patch.spectral_calls}")
    check(patch.spectral_calls == layers * 32 and cold > 0, "default settings ran the spectral attention over compressed blocks")
    patch.unpatch()

    flags_after = [m.__dict__.get("_unsloth_fast_path", "absent") for m in model.modules()]
    check(flags_after == flags_before, "unpatch restored every module's flag")
    check(model.generate.__func__ is original_generate.__func__ and model.generate.__name__ == "unsloth_fast_generate",
          "unpatch restored Unsloth's generate wrapper")
    again = model.generate(**kw)
    check(torch.equal(again.sequences, fast.sequences), "after unpatch: fast path tokens again")
    check(any("paged_attention" in a.__dict__ for a in attn), "after unpatch: the fast path runs again (paged buffers back)")


def run_fp32(kind: str, root: str) -> None:
    """Strict token equality where it is numerically meaningful: the same tiny model loaded in
    float32 through FastLanguageModel (bf16 near-ties flip argmax under any reordering)."""
    print(f"\n=== {kind} fp32 ===")
    model, _ = FastLanguageModel.from_pretrained(
        save_tiny(kind, root), max_seq_length=2048, dtype=torch.float32, load_in_4bit=False, local_files_only=True
    )
    FastLanguageModel.for_inference(model)
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(f"  parameter dtypes after load: {dtypes}")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(4, 256, (1, 40), generator=g).cuda()
    kw = dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=48, do_sample=False,
              eos_token_id=None)
    fast = model.generate(**kw)
    fast_ran = any("paged_attention" in a.__dict__ for a in attn_modules(model))
    patch = patch_unsloth_attention(model, verbose=False, **LOSSLESS)
    out = model.generate(**kw)
    cold = sum(sum(layer.tiers.n_cold) for layer in patch.last_cache.spectral_layers)
    patch.unpatch()
    agree = (out[0, 40:] == fast[0, 40:]).float().mean().item()
    check(fast_ran and cold > 0 and torch.equal(out, fast),
          f"fp32: lossless spectral tokens == Unsloth fast path tokens (agreement {agree:.3f}, {cold} cold blocks, "
          f"fast path ran: {fast_ran})")


def main() -> int:
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"unsloth {unsloth.__version__}; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as root:
        for runner, label in ((run, ""), (run_fp32, " fp32")):
            for kind in ("llama", "qwen3", "mistral"):
                try:
                    runner(kind, root)
                except Exception:
                    traceback.print_exc(file=sys.stdout)
                    FAILED.append(f"{kind}{label}: exception")
    print(f"\n{'ALL CHECKS PASSED' if not FAILED else 'FAILED: ' + '; '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
