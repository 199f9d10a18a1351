"""Needle in a haystack: a fact at depths of real-text haystacks, answer by exact match.

The haystack is corpus text (token ids); the needle sentence carries a random 5-digit
number; the prompt (chat template of the instruct model) asks for it and the assistant
turn is primed with "The secret number is".  Greedy decoding runs through the method's
cache (token by token, explicit positions); recall = the digits appear in the answer.

Cost on a CPU is the prefill: it is done once per (length, trial) for the needle-free
haystack, once per depth for the part after the needle, and shared by every method whose
prefill attends exactly (their caches are built from the exact K/V, which is what their own
prefill would store).
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import torch

from .methods import CacheMethod, positions

__all__ = ["NEEDLE", "QUESTION", "ANSWER_PREFIX", "build_prompt", "exact_prefills", "greedy_answer", "run_niah"]

NEEDLE = "\nImportant note: the secret number is {secret}. Remember it.\n"
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
ANSWER_PREFIX = "The secret number is"


def _chat_parts(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the user content (chat template, or plain text)."""
    marker = "\x00MARK\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # no chat template (tiny test tokenizers)
        text = marker + "\n"
    head, _, tail = text.partition(marker)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return enc(head), enc("\n\n" + QUESTION + tail + ANSWER_PREFIX)


def build_prompt(tokenizer, haystack: list[int], length: int, depth: float, secret: str) -> list[int]:
    """Prompt ids of exactly ``length`` tokens with the needle at ``depth`` of the haystack.

    Parameters
    ----------
    tokenizer : HF tokenizer
    haystack : list[int]
        Corpus token ids (at least ``length`` of them).
    length : int
        Total prompt tokens.
    depth : float in [0, 1]
        Relative position of the needle inside the haystack part.
    secret : str
    """
    head, tail = _chat_parts(tokenizer)
    needle = tokenizer(NEEDLE.format(secret=secret), add_special_tokens=False)["input_ids"]
    n_hay = length - len(head) - len(tail) - len(needle)
    if n_hay <= 0 or n_hay > len(haystack):
        raise ValueError(f"cannot build a {length}-token prompt from a {len(haystack)}-token haystack")
    hay = haystack[:n_hay]
    at = int(round(depth * n_hay))
    ids = head + hay[:at] + needle + hay[at:] + tail
    assert len(ids) == length
    return ids


def _exact_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def exact_prefills(model, tokenizer, haystack: list[int], length: int, depths: list[float], secret: str):
    """Yield ``(depth, ids, kv, first_logits)`` for every depth, sharing one exact prefill.

    The haystack without the needle is prefilled once into a ``DynamicCache``; for each depth
    its K/V up to the needle (causal attention: identical to the full prompt's prefix) is
    copied and only the needle, the rest of the haystack and the question are prefilled on
    top.  ``kv`` is the exact per-layer K/V of the whole prompt, ``first_logits`` the logits
    after its last token.
    """
    from transformers import DynamicCache

    prompts = [(d, build_prompt(tokenizer, haystack, length, d, secret)) for d in depths]
    starts = [_needle_start(tokenizer, haystack, length, d, secret) for d in depths]
    base = DynamicCache(config=model.config)
    if max(starts):
        model(torch.tensor([_prefix(tokenizer, haystack, max(starts))], device=model.device), past_key_values=base, use_cache=True,
              logits_to_keep=1)
    for (depth, ids), p in zip(prompts, starts):
        assert ids[:p] == _prefix(tokenizer, haystack, p)
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(base.layers if p else []):
            cache.update(layer.keys[:, :, :p].clone(), layer.values[:, :, :p].clone(), i)
        cp = torch.arange(p, length, device=model.device)
        out = model(torch.tensor([ids[p:]], device=model.device), past_key_values=cache, use_cache=True, cache_position=cp,
                    position_ids=cp[None], logits_to_keep=1)
        yield depth, ids, _exact_kv(cache), out.logits[0, -1]


def _prefix(tokenizer, haystack: list[int], n: int) -> list[int]:
    """The first ``n`` ids every prompt shares before its needle: chat head + haystack."""
    head, _ = _chat_parts(tokenizer)
    return (head + haystack[: max(0, n - len(head))])[:n]


def _needle_start(tokenizer, haystack: list[int], length: int, depth: float, secret: str) -> int:
    """Index of the needle's first token in :func:`build_prompt`'s ids."""
    head, tail = _chat_parts(tokenizer)
    needle = tokenizer(NEEDLE.format(secret=secret), add_special_tokens=False)["input_ids"]
    n_hay = length - len(head) - len(tail) - len(needle)
    return len(head) + int(round(depth * n_hay))


@torch.inference_mode()
def greedy_answer(
    model, method: CacheMethod, ids: list[int], max_new_tokens: int, seed=None, stop=None
) -> list[int]:
    """Greedy continuation of ``ids`` through a fresh cache of ``method`` (setup applied).

    Parameters
    ----------
    seed : (kv, first_logits), optional
        The exact prefill of ``ids`` (:func:`exact_prefills`): the method's cache is built from
        it (:meth:`CacheMethod.seed_cache`) instead of prefilling again; only for methods whose
        prefill attends exactly (``method.can_seed``), for which the two are the same.
    stop : callable(list[int]) -> bool, optional
        Stop early once it returns True for the tokens so far.
    """
    if seed is not None and method.can_seed:
        cache = method.seed_cache(model, seed[0])
        logits = seed[1]
    else:
        cache = method.new_cache(model)
        with method.prefill_context(model):
            logits = model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    new: list[int] = []
    pos = len(ids)
    eos = getattr(model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        new.append(tok)
        if tok in eos or (stop is not None and stop(new)) or len(new) == max_new_tokens:
            break
        cp, pid = positions(cache, pos, 1)
        logits = model(torch.tensor([[tok]], device=model.device), past_key_values=cache, use_cache=True,
                       cache_position=cp.to(model.device), position_ids=pid.to(model.device)).logits[0, -1]
        pos += 1
    return new


def run_niah(
    model,
    tokenizer,
    methods: list[CacheMethod],
    haystack: list[int],
    lengths: list[int],
    depths: list[float],
    trials: int = 1,
    max_new_tokens: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Recall per (length, depth) for every method.

    Per (length, trial) one haystack and secret; the exact prefill is shared across depths
    (:func:`exact_prefills`) and across methods (seeded caches); eviction methods prefill
    the whole prompt themselves under their press. Decoding stops once the secret appears.

    Returns
    -------
    dict
        ``lengths``, ``depths``, and ``methods``: spec -> {``recall``: [[float]] (lengths x
        depths), ``cases``: list of per-trial records (length, depth, secret, answer, hit),
        ``seconds`` (its decoding and seeding; the shared exact prefills are in
        ``prefill_seconds``)}.
    """
    rng = random.Random(seed)
    out: dict[str, Any] = {"lengths": lengths, "depths": depths, "trials": trials, "max_new_tokens": max_new_tokens,
                           "prefill": "exact prefill shared across depths and seeded into each method's cache; "
                                      "eviction methods prefill under their press", "methods": {}}
    hits = {m.spec: [[0] * len(depths) for _ in lengths] for m in methods}
    records: dict[str, list] = {m.spec: [] for m in methods}
    seconds = {m.spec: 0.0 for m in methods}
    prefill_s = 0.0
    for li, length in enumerate(lengths):
        for t in range(trials):
            secret = str(rng.randint(10000, 99999))
            start = rng.randint(0, max(0, len(haystack) - length))
            hay = haystack[start:]
            stop = lambda toks, s=secret: s in tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
            t0 = time.perf_counter()
            for depth, ids, kv, first in exact_prefills(model, tokenizer, hay, length, depths, secret):
                prefill_s += time.perf_counter() - t0
                di = depths.index(depth)
                for method in methods:
                    t1 = time.perf_counter()
                    method.setup(model)
                    try:
                        toks = greedy_answer(model, method, ids, max_new_tokens, seed=(kv, first), stop=stop)
                    finally:
                        method.teardown(model)
                    ans = tokenizer.decode(toks, skip_special_tokens=True)
                    hit = secret in ans
                    hits[method.spec][li][di] += int(hit)
                    records[method.spec].append(
                        {"length": length, "depth": depth, "secret": secret, "answer": ans, "hit": hit}
                    )
                    seconds[method.spec] += time.perf_counter() - t1
                del kv
                t0 = time.perf_counter()
            log(f"  niah length {length} trial {t + 1}: " + ", ".join(
                f"{m.spec} {[h / (t + 1) for h in hits[m.spec][li]]}" for m in methods) + f" (prefill total {prefill_s:.0f}s)")
    for method in methods:
        recall = [[h / trials for h in row] for row in hits[method.spec]]
        out["methods"][method.spec] = {"recall": recall, "cases": records[method.spec], "seconds": seconds[method.spec]}
        log(f"  niah {method.spec:24s} recall {recall}  ({seconds[method.spec]:.0f}s)")
    out["prefill_seconds"] = prefill_s
    return out
