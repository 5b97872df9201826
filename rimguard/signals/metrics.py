"""Entanglement and forgetting metrics, as pure tensor functions.

Notation (Yan et al., "When Thinking Backfires", arXiv 2509.00544): for a neuron set ``S`` of size ``n``, ``safe0``/``safet``
are activations on safety probes under the base model and now, ``task0``/``taskt`` on reasoning
data. A neuron's activation on a prompt is its max over tokens; activations are averaged over
prompts. All vectors are ``[..., n]``; leading dimensions are batch dimensions (e.g. many
control sets at once).

Choices the paper leaves open, fixed here:

* **Zero and negative activations.** SiLU-gated products can be 0 or negative, where the ratio
  ``(a0 - at) / at`` blows up or flips sign. Every activation is clamped from below to ``floor``
  before the formulas; ``floor = rel_floor * mean(|safe0|, |task0|)`` over the set (see
  :func:`activation_floor`), so the guard scales with the model.
* **Who counts in n.** Every neuron of the set: neurons that fail the condition contribute 0
  (the paper's ``1/n`` with the sum restricted to the condition).
* **RAS at zero.** ``RAS = 0`` when both shifts are 0.
* **Non-finite inputs.** A NaN or infinite activation makes every shift and RAS it enters NaN
  (never 0): a fault must not read as "no shift". The guard reports it as a ``fault``.
* **Missing values (mixture-of-experts).** A MoE unit whose expert received no token of any probe
  has no value. The caller says which entries have one (``present``, ``[..., n]`` bool); the others
  are left out entirely: out of the sums, out of ``n`` and out of the floor. A set with no present
  entry has no value (NaN). Entries marked present follow the rule above.
"""

from __future__ import annotations

import math

import torch

DEFAULT_REL_FLOOR = 0.05


def _mean(x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dimension, of the ``present`` entries only (NaN if none)."""
    if present is None:
        return x.mean(dim=-1)
    kept = torch.where(present, x, torch.zeros_like(x)).sum(dim=-1)
    count = present.sum(dim=-1)
    return torch.where(count > 0, kept / count.clamp_min(1), torch.full_like(kept, float("nan")))


def _fill(x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """``x`` with its absent entries set to 1 (a neutral value that the masked means then leave out)."""
    return x if present is None else torch.where(present, x, torch.ones_like(x))


def activation_floor(safe0: torch.Tensor, task0: torch.Tensor, rel_floor: float = DEFAULT_REL_FLOOR,
                     present: torch.Tensor | None = None) -> torch.Tensor:
    """Lower clamp for activations: ``rel_floor`` times the mean absolute base activation.

    Returns a ``[...]`` tensor (one floor per set), never below ``1e-8``.
    """
    scale = 0.5 * (_mean(_fill(safe0, present).abs(), present) + _mean(_fill(task0, present).abs(), present))
    return (rel_floor * scale).clamp_min(1e-8)


def _clamp(a: torch.Tensor, floor: torch.Tensor | float) -> torch.Tensor:
    floor_t = torch.as_tensor(floor, dtype=a.dtype, device=a.device)
    if floor_t.dim() > 0:
        floor_t = floor_t.unsqueeze(-1)
    return torch.maximum(a, floor_t)


def safety_drop(safe0: torch.Tensor, safet: torch.Tensor, floor: torch.Tensor | float,
                present: torch.Tensor | None = None) -> torch.Tensor:
    """delta-minus-safe: ``(1/n) sum_{j: a0 > at} ((a0 - at) / at) * a0``. Shape ``[...]``."""
    safe0, safet = _fill(safe0, present), _fill(safet, present)
    a0, at = _clamp(safe0, floor), _clamp(safet, floor)
    term = torch.where(a0 > at, (a0 - at) / at * a0, torch.zeros_like(a0))
    return _mean(_poison(term, a0, at, safe0, safet), present)


def task_rise(task0: torch.Tensor, taskt: torch.Tensor, floor: torch.Tensor | float,
              present: torch.Tensor | None = None) -> torch.Tensor:
    """delta-plus-task: ``(1/n) sum_{j: at > a0} ((at - a0) / a0) * at``. Shape ``[...]``."""
    task0, taskt = _fill(task0, present), _fill(taskt, present)
    a0, at = _clamp(task0, floor), _clamp(taskt, floor)
    term = torch.where(at > a0, (at - a0) / a0 * at, torch.zeros_like(a0))
    return _mean(_poison(term, a0, at, task0, taskt), present)


def _poison(term: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``term`` with NaN wherever an input is not finite (a comparison with NaN is False, which would read as 0)."""
    bad = torch.zeros_like(term, dtype=torch.bool)
    for x in inputs:
        bad |= ~torch.isfinite(x)
    return term.masked_fill(bad, float("nan"))


def harmonic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2ab / (a + b)``, and 0 where ``a + b == 0``."""
    total = a + b
    out = torch.where(total > 0, 2 * a * b / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
    return _poison(out, a, b)


def ras(
    safe0: torch.Tensor,
    safet: torch.Tensor,
    task0: torch.Tensor,
    taskt: torch.Tensor,
    rel_floor: float = DEFAULT_REL_FLOOR,
    present: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Reciprocal Activation Shift of one or many neuron sets.

    Args:
        safe0, safet, task0, taskt: ``[..., n]`` activations (see module docstring).
        rel_floor: activation floor relative to the mean base activation of each set.
        present: ``[..., n]`` bool, the entries that have a value in all four (None: all).

    Returns:
        ``{"safety_drop", "task_rise", "ras"}``, each ``[...]``.
    """
    floor = activation_floor(safe0, task0, rel_floor, present)
    drop = safety_drop(safe0, safet, floor, present)
    rise = task_rise(task0, taskt, floor, present)
    return {"safety_drop": drop, "task_rise": rise, "ras": harmonic(drop, rise)}


def null_score(value: torch.Tensor, null: torch.Tensor) -> dict[str, torch.Tensor]:
    """Place ``value`` (``[]``) in a null distribution ``null`` (``[K]``, e.g. RAS of K control sets).

    Returns:
        ``z``: ``(value - mean) / std`` with ``std`` floored at ``1e-3 * |mean| + 1e-12``;
        ``percentile``: share of the null strictly below ``value``, in ``[0, 1]``.
    """
    mean = null.mean()
    std = null.std(unbiased=True) if null.numel() > 1 else torch.zeros_like(mean)
    std = torch.maximum(std, 1e-3 * mean.abs() + 1e-12)
    return {"z": (value - mean) / std, "percentile": (null < value).float().mean()}


def topk_kl(
    base_logp: torch.Tensor,
    base_index: torch.Tensor,
    logp: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(pi_0 || pi_t) per token on a top-k-plus-tail coarsening of the vocabulary, averaged over tokens.

    The base distribution is stored as its top-k log-probabilities; the remaining mass forms
    one "tail" bucket. KL on this (k+1)-way partition is a lower bound on the full KL (data
    processing inequality) and equals it when the base puts all its mass in the top k.

    Args:
        base_logp: ``[P, T, k]`` base log-probs of the top-k tokens.
        base_index: ``[P, T, k]`` their vocabulary ids.
        logp: ``[P, T, V]`` current log-probs over the full vocabulary.
        mask: ``[P, T]`` positions to average over (None = all).

    Returns:
        ``[]`` mean KL in nats.
    """
    cur = logp.gather(-1, base_index)
    p0 = base_logp.exp()
    tail0 = (1 - p0.sum(-1)).clamp_min(1e-12)
    tailt = (1 - cur.exp().sum(-1)).clamp_min(1e-12)
    per_token = (p0 * (base_logp - cur)).sum(-1) + tail0 * (tail0.log() - tailt.log())
    if mask is None:
        return per_token.mean()
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def refusal_margin(scores: torch.Tensor, num_refusal: int) -> torch.Tensor:
    """Per prompt, ``[P]`` nats: the mean log-prob of the refusal openings minus the mean log-prob of
    the compliance openings (the metric is its mean over prompts).

    Args:
        scores: ``[P, K]`` teacher-forced log-probabilities of the openings; the first ``num_refusal``
            columns are refusal openings, the rest compliance openings.
    """
    return scores[:, :num_refusal].mean(1) - scores[:, num_refusal:].mean(1)


def shrink_penalty(ref: torch.Tensor, now: torch.Tensor, rel_floor: float = DEFAULT_REL_FLOOR) -> torch.Tensor:
    """One-sided activation anchor: mean of ``relu((ref - now) / scale)^2``, the delta-minus-safe half of RAS.

    Penalises safety neurons whose activation on a safety prompt falls below its base value;
    a rise costs nothing. ``scale = max(|ref|, rel_floor * mean |ref|)`` per neuron, so the term is
    unit-free and a near-zero reference cannot blow it up.

    Args:
        ref: ``[..., n]`` base activations (max over tokens), detached.
        now: ``[..., n]`` current activations, differentiable.

    Returns:
        ``[]`` mean over all entries (0 for an empty input). A MoE unit without a routed token in
        ``ref`` or ``now`` (NaN) adds 0 and is still counted.
    """
    if ref.numel() == 0:
        return now.sum() * 0
    valid = ~(torch.isnan(ref) | torch.isnan(now))
    ref_v, now_v = torch.where(valid, ref, torch.zeros_like(ref)), torch.where(valid, now, torch.zeros_like(now))
    scale = ref_v.abs().clamp_min(rel_floor * ref_v.abs().sum().div(valid.sum().clamp_min(1)).clamp_min(1e-8))
    return (torch.relu(ref_v - now_v) / scale).pow(2).mean()


def wilson(successes: float, n: float, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n`` (95% by default); ``(nan, nan)`` for ``n = 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
