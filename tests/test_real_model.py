"""The embedded SmolLM2-135M-Instruct with the library's default settings and the SVD layout.

Regression guard, not a goal: on this fixed prompt (validation-split pydoc text from token 5000, 1100 tokens
of context = 4 sinks + 2 cold blocks + exact tail, then 100 tokens teacher-forced through the
same cache) `python tests/test_real_model.py` prints PPL and top-1 agreement with the exact
cache per preset. Measured on the CPU on the shipped (frozen) validation text (exact PPL 4.648): ``original``
6.291 (+35.3%), agreement 0.84; ``fast`` (SVD k16/v32 int8 + 4 sinks) 5.002 (+7.6%), 0.92; ``balanced`` (the
default) 4.606 (-0.9%), 0.97; ``compact`` 4.592 (-1.2%), 0.96 (its 256-token hot tier leaves one cold block on
this prompt); ``max-compression`` 4.530 (-2.5%), 0.96 (results/real_model_guard.txt).
The bounds leave room for BLAS rounding only; a real regression moves them far more.
"""

import math

import pytest
import torch
from transformers import DynamicCache

import spectral_kv as sk
from spectral_kv.text import split_sources, stdlib_tokens

pytestmark = pytest.mark.slow

CONTEXT, CONTINUATION, CHUNK = 1100, 100, 33
# preset -> (max relative PPL increase, min top-1 agreement). balanced, compact and max-compression: the
# worst segment of each on the validation split (results/validation/ and results/validation/cpu/, the same
# text: +2.8% / 0.977, +5.5% / 0.953 and +11.7% / 0.938), rounded outwards, and below this prompt's own
# top-1 (balanced 0.970: 0.96 leaves room for one token flipped by BLAS rounding); fast: this prompt's
# measurement (+7.6% / 0.92) with room for rounding, since its validation worst (+144%) would guard
# nothing. This prompt is validation text too.
BOUNDS = {"fast": (0.20, 0.85), "balanced": (0.03, 0.96), "max-compression": (0.12, 0.92), "compact": (0.06, 0.94)}


def validation_tokens(tok, n, offset=5000):
    """``n`` tokens of the validation split's pydoc text from token ``offset`` (a text no preset was tuned on)."""
    _, text, _ = split_sources("validation")[0]
    return tok(text, add_special_tokens=False)["input_ids"][offset : offset + n]


def teacher_forced(model, ids, cache):
    with torch.no_grad():
        logits = [model(ids[:, :CONTEXT], past_key_values=cache).logits[:, -1:]]
        for start in range(CONTEXT, CONTEXT + CONTINUATION - 1, CHUNK):
            stop = min(start + CHUNK, CONTEXT + CONTINUATION - 1)
            logits.append(model(ids[:, start:stop], past_key_values=cache).logits)
    logits = torch.cat(logits, dim=1)[0]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, CONTEXT : CONTEXT + CONTINUATION])
    return math.exp(nll.item()), logits.argmax(-1)


def measure(model, tok, preset):
    ids = torch.tensor([validation_tokens(tok, CONTEXT + CONTINUATION)])
    ppl_exact, top_exact = teacher_forced(model, ids, DynamicCache())
    patch = sk.patch_unsloth_attention(model, verbose=False, preset=preset)
    try:
        cache = patch.new_cache()
        ppl, top = teacher_forced(model, ids, cache)
    finally:
        patch.unpatch()
    return ppl_exact, ppl, float((top == top_exact).float().mean()), cache


@pytest.mark.parametrize("preset", sorted(BOUNDS))
def test_perplexity_guard(smollm2, preset):
    model, tok = smollm2
    ppl_exact, ppl, agreement, cache = measure(model, tok, preset)
    blocks = 1 if preset == "compact" else 2  # compact's 256-token hot tier holds back one more block here
    assert all(layer.tiers.n_cold == [blocks] for layer in cache.spectral_layers)  # compression really ran
    assert ppl != ppl_exact  # lossy: if equal, nothing was compressed
    max_rel, min_agree = BOUNDS[preset]
    assert ppl / ppl_exact - 1 < max_rel, (ppl_exact, ppl)
    assert agreement >= min_agree, agreement


def test_default_settings_generate_coherently(smollm2):
    model, tok = smollm2
    filler = tok.decode(stdlib_tokens(tok, 1200, offset=20000))
    messages = [{"role": "user", "content": filler + "\n\nForget the text above. What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    patch = sk.patch_unsloth_attention(model, verbose=False)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    finally:
        patch.unpatch()
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert sum(layer.tiers.n_cold[0] for layer in patch.last_cache.spectral_layers) == 2 * 30


if __name__ == "__main__":
    from spectral_kv.models import load_default_model

    model, tok = load_default_model(progress=False)
    for preset in ("original", "fast", "balanced", "compact", "max-compression"):
        e, p, a, _ = measure(model, tok, preset)
        print(f"{preset:16s} exact PPL {e:.3f}  spectral PPL {p:.3f}  ({p / e - 1:+.1%})  top-1 agreement {a:.3f}")
