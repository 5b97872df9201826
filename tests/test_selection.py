"""The selection math (rimguard.atlas.selection) against values computed by hand."""

import pytest
import torch

from rimguard.atlas import selection as S


def test_counterfactual_share_and_ranking_by_hand():
    # 2 pairs, 4 neurons; contrasts other - base: pair 0 [3, 1, 0, 2], pair 1 [0, 4, 1, 3]
    base = torch.zeros(2, 4)
    other = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 4.0, 1.0, 3.0]])
    found = S.counterfactual(base, other, m=2, min_share=1.0)
    # top-2: pair 0 {0, 3}, pair 1 {1, 3}: only neuron 3 is in both
    assert found.chosen.tolist() == [3] and found.score.tolist() == [1.0]
    # share [0.5, 0.5, 0, 1]; mean contrast [1.5, 2.5, 0.5, 2.5] / (2 * 2 * 2.5) breaks the 0.5 tie
    torch.testing.assert_close(found.ranking, torch.tensor([0.5 + 0.15, 0.5 + 0.25, 0.05, 1.25]))
    half = S.counterfactual(base, other, m=2, min_share=0.5)
    assert half.chosen.tolist()[0] == 3 and sorted(half.chosen.tolist()) == [0, 1, 3]
    with pytest.raises(S.SelectionError, match="lower min_share"):
        S.counterfactual(base, other, m=1, min_share=1.0)  # top-1: {0} and {1}


def test_cohens_d_by_hand():
    a = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0], var [2, 0]
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # mean [0, 1], var [0, 0]
    # pooled sd: sqrt((1 * 2 + 2 * 0) / 3) = sqrt(2/3); neuron 1: 0 / clamp(0) -> -1 / 1e-6
    d = S.cohens_d(S.Moments.of(a), S.Moments.of(b))
    torch.testing.assert_close(d, torch.tensor([2.0 / (2.0 / 3.0) ** 0.5, -1.0 / 1e-6]))
    found = S.effect_size(S.Moments.of(a), S.Moments.of(b), m=1)
    assert found.chosen.tolist() == [0]


def test_matched_controls_are_per_layer_disjoint_and_seeded():
    sizes, safety = [4, 6], torch.tensor([1, 5, 7])  # one neuron in layer 0, two in layer 1
    sets = S.matched_controls(safety, sizes, k=5, seed=3)
    assert sets.shape == (5, 3)
    assert ((sets[:, 0] >= 0) & (sets[:, 0] < 4)).all() and ((sets[:, 1:] >= 4) & (sets[:, 1:] < 10)).all()
    assert not (torch.isin(sets, safety)).any()
    assert torch.equal(sets, S.matched_controls(safety, sizes, k=5, seed=3))
    with pytest.raises(S.SelectionError, match="only 0 others"):
        S.matched_controls(torch.tensor([0, 1]), [2, 2], k=1, seed=0)


def test_tracked_layout_by_hand():
    tracked, safety, controls = S.tracked_layout(torch.tensor([5, 1]), torch.tensor([[2, 7]]), [4, 6])
    assert tracked.tolist() == [[0, 1], [0, 2], [1, 1], [1, 3]]  # flat 1, 2, 5, 7
    assert safety.tolist() == [2, 0] and controls.tolist() == [[1, 3]]


def test_top_share_per_layer_and_top_fraction_by_hand():
    ranking = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.2, 0.7])  # layers of sizes 2 and 4
    assert [g.tolist() for g in S.top_share_per_layer(ranking, [2, 4], 0.5)] == [[1], [1, 3]]  # flat 1, 3, 5
    assert sum(g.numel() for g in S.top_share_per_layer(ranking, [2, 4], 0.01)) == 1  # at least one
    assert S.top_fraction(torch.tensor([0.3, 0.1, 0.9, 0.5]), 0.5).tolist() == [False, False, True, True]
    assert S.top_fraction(torch.tensor([0.3, 0.1]), 0.01).tolist() == [True, False]
