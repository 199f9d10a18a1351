"""Needle in a haystack: a fact at depths of real-text haystacks, answer by exact match.

The haystack is corpus text (token ids); the needle sentence carries a random 5-digit
number; the prompt (chat template of the instruct model) asks for it and the assistant
turn is primed with "The secret number is".  Greedy decoding runs through the method's
cache (token by token, explicit positions); recall = the digits appear in the answer.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import torch

from .methods import CacheMethod

__all__ = ["NEEDLE", "QUESTION", "ANSWER_PREFIX", "build_prompt", "greedy_answer", "run_niah"]

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


@torch.inference_mode()
def greedy_answer(model, method: CacheMethod, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` through a fresh cache of ``method`` (setup applied)."""
    cache = method.new_cache(model)
    x = torch.tensor([ids])
    with method.prefill_context(model):
        out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
    new: list[int] = []
    pos = len(ids)
    for _ in range(max_new_tokens):
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        cp = torch.tensor([pos])
        out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True, cache_position=cp, position_ids=cp[None])
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

    Returns
    -------
    dict
        ``lengths``, ``depths``, and ``methods``: spec -> {``recall``: [[float]] (lengths x
        depths), ``cases``: list of per-trial records (length, depth, secret, answer, hit)}.
    """
    rng = random.Random(seed)
    cases = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for t in range(trials):
                secret = str(rng.randint(10000, 99999))
                start = rng.randint(0, max(0, len(haystack) - length))
                cases.append((li, di, length, depth, secret, start))
    out: dict[str, Any] = {"lengths": lengths, "depths": depths, "trials": trials, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        hits = [[0] * len(depths) for _ in lengths]
        records = []
        method.setup(model)
        try:
            for li, di, length, depth, secret, start in cases:
                ids = build_prompt(tokenizer, haystack[start:], length, depth, secret)
                ans = tokenizer.decode(greedy_answer(model, method, ids, max_new_tokens), skip_special_tokens=True)
                hit = secret in ans
                hits[li][di] += int(hit)
                records.append({"length": length, "depth": depth, "secret": secret, "answer": ans, "hit": hit})
        finally:
            method.teardown(model)
        recall = [[h / trials for h in row] for row in hits]
        out["methods"][method.spec] = {"recall": recall, "cases": records, "seconds": time.perf_counter() - t0}
        log(f"  niah {method.spec:24s} recall {recall}  ({time.perf_counter() - t0:.0f}s)")
    return out
