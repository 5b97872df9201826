import math

import pytest
import torch

from rimguard.signals import metrics


def test_ras_matches_hand_computation():
    # Two neurons; floor tiny so it does not bind.
    safe0, safet = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.5])
    task0, taskt = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    floor = 1e-6
    # delta-minus: only neuron 0 drops: ((2-1)/1)*2 = 2, over n=2 -> 1.0
    assert metrics.safety_drop(safe0, safet, floor).item() == pytest.approx(1.0)
    # delta-plus: only neuron 0 rises: ((3-1)/1)*3 = 6, over n=2 -> 3.0
    assert metrics.task_rise(task0, taskt, floor).item() == pytest.approx(3.0)
    out = metrics.ras(safe0, safet, task0, taskt, rel_floor=1e-6)
    assert out["ras"].item() == pytest.approx(2 * 1.0 * 3.0 / 4.0)


def test_ras_is_zero_without_shift_and_batched_over_sets():
    a = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    out = metrics.ras(a, a, a, a)
    assert out["ras"].shape == (2,)
    assert torch.equal(out["ras"], torch.zeros(2))


def test_floor_guards_zero_and_negative_activations():
    safe0, safet = torch.tensor([1.0, 1.0]), torch.tensor([0.0, -3.0])
    task0, taskt = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])
    floor = metrics.activation_floor(safe0, task0, rel_floor=0.1)
    assert floor.item() == pytest.approx(0.1)
    # both current activations clamp to 0.1: ((1-0.1)/0.1)*1 = 9 each -> mean 9
    drop = metrics.safety_drop(safe0, safet, floor)
    assert drop.item() == pytest.approx(9.0)
    assert math.isfinite(metrics.ras(safe0, safet, task0, taskt, 0.1)["ras"].item())


def test_harmonic_zero_when_both_zero():
    assert metrics.harmonic(torch.tensor(0.0), torch.tensor(0.0)).item() == 0.0
    assert metrics.harmonic(torch.tensor(1.0), torch.tensor(3.0)).item() == pytest.approx(1.5)


def test_null_score():
    null = torch.tensor([1.0, 2.0, 3.0])
    out = metrics.null_score(torch.tensor(4.0), null)
    assert out["z"].item() == pytest.approx((4 - 2) / 1.0)
    assert out["percentile"].item() == pytest.approx(1.0)
    assert metrics.null_score(torch.tensor(2.5), null)["percentile"].item() == pytest.approx(2 / 3)


def test_topk_kl_hand_computed_and_exact_with_full_support():
    p0 = torch.tensor([0.5, 0.3, 0.2])
    pt = torch.tensor([0.2, 0.5, 0.3])
    full = (p0 * (p0.log() - pt.log())).sum()
    # top-2 of the base: tokens 0 and 1; tail bucket holds token 2 (0.2 vs 0.3)
    base_logp = p0[:2].log().view(1, 1, 2)
    base_index = torch.tensor([0, 1]).view(1, 1, 2)
    kl = metrics.topk_kl(base_logp, base_index, pt.log().view(1, 1, 3))
    assert kl.item() == pytest.approx(full.item(), rel=1e-5)  # a single tail token: the partition is exact
    # a 2-token tail merges tokens, giving a lower bound
    p0b, ptb = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.3, 0.1, 0.6])
    fullb = (p0b * (p0b.log() - ptb.log())).sum()
    klb = metrics.topk_kl(p0b[:1].log().view(1, 1, 1), torch.tensor([[[0]]]), ptb.log().view(1, 1, 3))
    hand = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert klb.item() == pytest.approx(hand, rel=1e-5)
    assert klb.item() <= fullb.item()


def test_topk_kl_mask_averages_only_real_tokens():
    base = torch.log(torch.tensor([[[0.9], [0.9]]]))
    index = torch.zeros(1, 2, 1, dtype=torch.long)
    cur = torch.log(torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]))
    kl_masked = metrics.topk_kl(base, index, cur, torch.tensor([[1, 0]]))
    assert kl_masked.item() == pytest.approx(0.0, abs=1e-6)


def test_refusal_margin():
    # two prompts; openings: 2 refusal, 1 compliance. Prompt 0: (-1 + -3)/2 - (-3) = 1; prompt 1: (-2 + -2)/2 - (-5) = 3
    scores = torch.tensor([[-1.0, -3.0, -3.0], [-2.0, -2.0, -5.0]])
    torch.testing.assert_close(metrics.refusal_margin(scores, 2), torch.tensor([1.0, 3.0]))
