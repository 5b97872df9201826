"""Which neurons are safety-critical: the selection math, pure (no model, no hooks).

Neurons are flat ids over all MLP layers (layer-major: layer ``l``'s unit ``j`` is
``sum(sizes[:l]) + j``). Activations are per-prompt maxima over tokens, ``[P, N]``; a MoE unit
whose expert got no token of a prompt is NaN there, and the rules below use only the prompts
(pairs) where it has a value.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class SelectionError(ValueError):
    """No neuron meets the selection rule; the message says which setting to relax."""


class Moments(NamedTuple):
    """Per-neuron mean and (unbiased) variance over ``count`` prompts, ``[N]`` float32 each."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int | torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> "Moments":
        """Of a ``[P, N]`` matrix (over the rows with a value, per neuron, where some are NaN: ``count`` is then ``[N]``)."""
        missing = torch.isnan(x)
        if not bool(missing.any()):
            return cls(x.mean(0), x.var(0), x.shape[0])
        count = (~missing).sum(0)
        mean = x.nansum(0) / count.clamp_min(1)
        var = (x - mean).pow(2).nansum(0) / (count - 1).clamp_min(1)
        return cls(mean, var, count)


class Selection(NamedTuple):
    """Chosen flat ids ``[n]`` (best first), their scores ``[n]``, and a score for every neuron ``[N]``."""

    chosen: torch.Tensor
    score: torch.Tensor
    ranking: torch.Tensor


class PairTally(NamedTuple):
    """The counterfactual rule's running sums over pairs, ``[N]`` each: how often each neuron was in its pair's
    top-``m`` (``hits``), and the sum and count of its contrast where it had a value. Sums over chunks of pairs
    add up (:meth:`plus`), so the harmful side streams: memory ``O(N)`` however many pairs."""

    hits: torch.Tensor
    contrast: torch.Tensor
    counted: torch.Tensor
    pairs: int

    @classmethod
    def of(cls, base: torch.Tensor, other: torch.Tensor, m: int) -> "PairTally":
        """Of ``[P, N]`` activations of P pairs (``base[k]`` a harmful request, ``other[k]`` its contrast)."""
        diff = other - base
        top = diff.nan_to_num(nan=float("-inf")).topk(m, dim=1).indices  # a unit without a value in a pair is never its top
        hits = torch.zeros(base.shape[1], device=base.device).index_add_(0, top.reshape(-1), torch.ones(top.numel(), device=base.device))
        has = ~torch.isnan(diff)
        return cls(hits, diff.nan_to_num(nan=0.0).sum(0), has.sum(0).float(), base.shape[0])

    def plus(self, other: "PairTally") -> "PairTally":
        return PairTally(self.hits + other.hits, self.contrast + other.contrast, self.counted + other.counted, self.pairs + other.pairs)


def counterfactual(base: torch.Tensor, other: torch.Tensor, m: int, min_share: float) -> Selection:
    """The paper's rule: for each pair k (``base[k]`` a harmful request, ``other[k]`` it plus a
    malicious-intent sentence), the top-``m`` neurons of ``other[k] - base[k]``; keep the neurons in
    that top-``m`` for at least a share ``min_share`` of the pairs (1.0 = the intersection).

    Score: the share of pairs. Ranking of every neuron: the share, ties broken by the mean contrast
    (scaled below half a pair, so it never reorders different shares). The same as
    :func:`select_counterfactual` of a :class:`PairTally` summed over chunks of the pairs.
    """
    return select_counterfactual(PairTally.of(base, other, m), m, min_share)


def select_counterfactual(tally: PairTally, m: int, min_share: float) -> Selection:
    """:func:`counterfactual`'s choice from the running sums of all pairs."""
    share = tally.hits / tally.pairs
    chosen = (share >= min_share - 1e-9).nonzero().squeeze(1)
    if chosen.numel() == 0:
        raise SelectionError(f"no neuron is in the top {m} of at least {min_share:.0%} of the {tally.pairs} pairs "
                             f"(the best reaches {share.max().item():.0%}); lower min_share or raise top_m")
    contrast = torch.where(tally.counted > 0, tally.contrast / tally.counted.clamp_min(1), torch.zeros_like(tally.contrast))
    ranking = share + contrast / (2 * tally.pairs * contrast.abs().max().clamp_min(1e-12))
    return _best_first(chosen, share[chosen], ranking)


def cohens_d(a: Moments, b: Moments) -> torch.Tensor:
    """Effect size of ``a`` over ``b`` per neuron: mean difference over the pooled standard deviation. ``[N]``."""
    dof = torch.as_tensor(a.count + b.count - 2, dtype=a.var.dtype).clamp_min(1)
    pooled = (((a.count - 1) * a.var + (b.count - 1) * b.var) / dof).sqrt()
    d = (a.mean - b.mean) / pooled.clamp_min(1e-6)
    valid = (torch.as_tensor(a.count) > 0) & (torch.as_tensor(b.count) > 0)  # a MoE unit needs a value on each side
    return torch.where(valid.to(d.device), d, torch.full_like(d, float("nan")))


def effect_size(harmful: Moments, harmless: Moments, m: int) -> Selection:
    """The ``m`` neurons with the largest Cohen's d of harmful over harmless activations."""
    d = cohens_d(harmful, harmless).nan_to_num(nan=float("-inf"))  # no value on a side: never chosen
    chosen = d.topk(m).indices
    return _best_first(chosen, d[chosen], d)


def _best_first(chosen: torch.Tensor, score: torch.Tensor, ranking: torch.Tensor) -> Selection:
    order = score.argsort(descending=True)
    return Selection(chosen[order], score[order], ranking)


def layer_starts(sizes: Sequence[int]) -> torch.Tensor:
    """``[L + 1]`` flat id where each layer starts (and the total at the end)."""
    return torch.tensor([0, *sizes]).cumsum(0)


def matched_controls(safety: torch.Tensor, sizes: Sequence[int], k: int, seed: int) -> torch.Tensor:
    """``[k, n]`` flat ids: per set, as many random non-safety neurons of each layer as the safety set has there."""
    starts = layer_starts(sizes)
    layer_of = torch.bucketize(safety, starts[1:], right=True)
    gen = torch.Generator().manual_seed(seed)
    taken = torch.zeros(int(starts[-1]), dtype=torch.bool)
    taken[safety] = True
    sets = torch.empty((k, safety.numel()), dtype=torch.long)
    for layer in layer_of.unique().tolist():
        slots = (layer_of == layer).nonzero().squeeze(1)
        pool = (~taken[starts[layer] : starts[layer + 1]]).nonzero().squeeze(1) + starts[layer]
        if pool.numel() < slots.numel():
            raise SelectionError(f"layer {layer} has {slots.numel()} safety neurons but only {pool.numel()} others to draw controls from")
        for row in range(k):
            sets[row, slots] = pool[torch.randperm(pool.numel(), generator=gen)[: slots.numel()]]
    return sets


def tracked_layout(safety: torch.Tensor, controls: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The union of safety and control ids as ``tracked`` ``[N, 2]`` (layer, unit), layer-major, and the
    positions in it of the safety set ``[n]`` and of each control set ``[k, n]``."""
    starts = layer_starts(sizes)
    flat, inverse = torch.unique(torch.cat([safety, controls.reshape(-1)]), return_inverse=True)
    layer_of = torch.bucketize(flat, starts, right=True) - 1
    n = safety.numel()
    return torch.stack([layer_of, flat - starts[layer_of]], dim=1), inverse[:n].clone(), inverse[n:].reshape(controls.shape).clone()


def top_share_per_layer(ranking: torch.Tensor, sizes: Sequence[int], share: float) -> list[torch.Tensor]:
    """The top ``round(share * total)`` (at least 1) of a flat ``[total]`` ranking, as unit ids per layer."""
    keep = max(1, int(round(share * ranking.numel())))
    flat = ranking.topk(keep).indices.sort().values
    starts = layer_starts(sizes)
    return [flat[(flat >= starts[i]) & (flat < starts[i + 1])] - starts[i] for i in range(len(sizes))]


def top_fraction(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[n]`` bool: the ``round(fraction * n)`` (at least 1) largest ``values``."""
    keep = max(1, int(round(fraction * values.numel())))
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    mask[values.topk(keep).indices] = True
    return mask
