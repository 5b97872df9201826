"""Pure math of the refusal-head selection (no model, no I/O).

Inputs are attention rows of the *answer position* (the last prompt position, where the first
generated token is predicted) over the keys of a prompt whose assistant turn starts with a reasoning
span, ``[start, end)`` in key positions. Two sets of prompts get the same spans: harmful requests,
which the aligned model refuses, and harmless look-alikes, which it answers.

The rule, per head ``(l, h)``:

* ``mass_refuse``, ``mass_comply``: its mean attention mass on the reasoning span (a share of the
  answer position's attention, in [0, 1]) over the harmful and over the harmless prompts;
* ``away``: the share of harmful prompts on which the key it attends to most lies *outside* the span;
* ``separation = mass_comply - mass_refuse``: how much less the head reads the reasoning when the
  model refuses than when it complies;
* a head is *eligible* when ``away > 1/2`` (on most refused prompts its focus is off the reasoning:
  the paper's heads that enable refusal by attending away from the chain of thought) and
  ``separation > 0``;
* the refusal heads are the ``k`` eligible heads of highest separation (ties: lower layer, then lower
  head first). Their base mass is ``mass_refuse``: reasoning training that pulls these heads back onto
  the reasoning raises it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWAY_SHARE = 0.5  # a refusal head's focus is off the span on more than this share of harmful prompts


def _inside(spans: torch.Tensor, length: int, dims: int) -> torch.Tensor:
    """``[B, 1, ..., 1, T]`` bool: key positions in ``[start, end)`` of each row's span (``dims`` total dims)."""
    pos = torch.arange(length, device=spans.device)
    inside = (pos >= spans[:, :1]) & (pos < spans[:, 1:])
    return inside.view(spans.shape[0], *([1] * (dims - 2)), length)


def span_mass(rows: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Attention mass on each row's span.

    Args:
        rows: ``[B, ..., T]`` attention weights of one query position over ``T`` keys (e.g. ``[B, L, H, T]``).
        spans: ``[B, 2]`` long, ``(start, end)`` key positions of each row's span (end exclusive).

    Returns:
        ``[B, ...]``: the summed weight on ``[start, end)`` (a share of the row, in [0, 1] for softmax rows).
    """
    return (rows * _inside(spans, rows.shape[-1], rows.dim())).sum(-1)


def top_in_span(rows: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Whether the most-attended key lies in the span: ``[B, ...]`` bool (shapes as :func:`span_mass`)."""
    top = rows.argmax(dim=-1, keepdim=True)
    return _inside(spans, rows.shape[-1], rows.dim()).expand_as(rows).gather(-1, top).squeeze(-1)


def refusal_head_scores(mass_refuse: torch.Tensor, mass_comply: torch.Tensor,
                        top_in_span_refuse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Separation and eligibility of every head (see module docstring).

    Args:
        mass_refuse: ``[P, L, H]`` span mass per harmful prompt.
        mass_comply: ``[Q, L, H]`` span mass per harmless prompt.
        top_in_span_refuse: ``[P, L, H]`` bool, the most-attended key of a harmful prompt is in its span.

    Returns:
        ``(separation [L, H] float32, eligible [L, H] bool)``; separation in attention-mass units.
    """
    separation = (mass_comply.float().mean(0) - mass_refuse.float().mean(0))
    away = (~top_in_span_refuse).float().mean(0)
    return separation, (away > AWAY_SHARE) & (separation > 0)


def select_heads(separation: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` eligible heads of highest separation, best first: ``[k', 2]`` long ``(layer, head)``,
    ``k' = min(k, number eligible)`` (ties: lower layer, then lower head first)."""
    heads_per_layer = separation.shape[1]
    ranked = separation.flatten().masked_fill(~eligible.flatten(), float("-inf"))
    order = torch.sort(ranked, descending=True, stable=True).indices[: min(k, int(eligible.sum()))]
    return torch.stack([order // heads_per_layer, order % heads_per_layer], dim=1)


@dataclass
class HeadSelection:
    """Chosen refusal heads: ``heads [k, 2]`` long ``(layer, head)``, best first; ``mass [k]`` their mean
    span mass on the harmful prompts (the base mass); ``score [k]`` their separation; ``heads_per_layer``
    the number of attention heads of each layer of the model."""

    heads: torch.Tensor
    mass: torch.Tensor
    score: torch.Tensor
    heads_per_layer: int

    @classmethod
    def of(cls, mass_refuse: torch.Tensor, mass_comply: torch.Tensor, top_in_span_refuse: torch.Tensor,
           k: int) -> "HeadSelection":
        """Score every head from ``[P, L, H]`` / ``[Q, L, H]`` measurements and keep the top ``k``."""
        separation, eligible = refusal_head_scores(mass_refuse, mass_comply, top_in_span_refuse)
        heads = select_heads(separation, eligible, k)
        base = mass_refuse.float().mean(0)
        return cls(heads, base[heads[:, 0], heads[:, 1]], separation[heads[:, 0], heads[:, 1]], separation.shape[1])
