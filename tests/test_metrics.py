"""Metric functions against hand-computed cases."""

import math

import pytest
import torch

from spectral_kv import metrics as M


def _logits_with_target_prob(p: float, V: int = 4, target: int = 0) -> torch.Tensor:
    """One row of logits giving ``target`` probability ``p`` and the rest equal."""
    rest = (1 - p) / (V - 1)
    row = torch.full((V,), math.log(rest))
    row[target] = math.log(p)
    return row


def test_identical_logits_give_zero_delta_and_full_agreement():
    torch.manual_seed(0)
    logits = torch.randn(16, 50)
    targets = torch.randint(0, 50, (16,))
    d = M.ppl_delta(logits, logits.clone(), targets)
    assert d["delta"] == 0.0 and d["rel"] == 0.0
    assert M.top1_agreement(logits, logits.clone()) == 1.0


def test_perplexity_hand_computed():
    uniform = torch.zeros(3, 4)
    assert M.perplexity(uniform, torch.tensor([0, 1, 2])) == pytest.approx(4.0)
    half = torch.stack([_logits_with_target_prob(0.5)] * 2)
    assert M.perplexity(half, torch.tensor([0, 0])) == pytest.approx(2.0)
    # mixed: probs 0.5 and 0.25 -> ppl = exp(-(ln .5 + ln .25)/2) = sqrt(8)
    mixed = torch.stack([_logits_with_target_prob(0.5), _logits_with_target_prob(0.25)])
    assert M.perplexity(mixed, torch.tensor([0, 0])) == pytest.approx(math.sqrt(8.0))
    d = M.ppl_delta(uniform[:2], half, torch.tensor([0, 0]))
    assert d["ppl"] == pytest.approx(4.0) and d["ppl_ref"] == pytest.approx(2.0)
    assert d["delta"] == pytest.approx(2.0) and d["rel"] == pytest.approx(1.0)


def test_top1_agreement_counts():
    ref = torch.eye(4)  # argmax = 0,1,2,3
    other = torch.eye(4)
    other[3] = torch.tensor([1.0, 0, 0, 0])  # last row now predicts 0
    assert M.top1_agreement(other, ref) == pytest.approx(0.75)


def test_score_correlation_hand_computed_and_misleading():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 4.0]])
    assert M.score_correlation(a, a) == pytest.approx(1.0)
    assert M.score_correlation(b, a) == pytest.approx(9 / math.sqrt(84))
    # affine change of scores: correlation stays 1 although the softmax changes
    scaled = 3.0 * a + 1.0
    assert M.score_correlation(scaled, a) == pytest.approx(1.0)
    assert M.attention_kl(scaled, a) > 0.1


def test_attention_kl_hand_computed():
    ref = torch.tensor([[0.0, 0.0]])  # p = [.5, .5]
    q = torch.tensor([[0.0, math.log(3.0)]])  # q = [.25, .75]
    assert M.attention_kl(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert M.attention_kl(q, ref) == pytest.approx(0.5 * math.log(4 / 3))


def test_output_relative_error_known_perturbation():
    ref = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    out = ref + torch.tensor([[0.0, 0.5], [0.0, 0.0]])
    assert M.output_relative_error(ref, ref) == 0.0
    assert M.output_relative_error(out, ref) == pytest.approx((0.1 + 0.0) / 2)


def test_topk_recall():
    ref = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    other = torch.tensor([[5.0, 1.0, 3.0, 2.0, 4.0]])
    assert M.topk_recall(ref, ref, 2) == 1.0
    assert M.topk_recall(other, ref, 2) == pytest.approx(0.5)
    assert M.topk_recall(other, ref, 10) == 1.0  # k clipped to S


def test_mean_and_spread():
    s = M.mean_and_spread([1.0, 2.0, 3.0])
    assert s["mean"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0)
    assert M.mean_and_spread([4.0])["std"] == 0.0
