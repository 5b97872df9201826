"""The activation penalty: an action on the safety-critical neurons' activations.

On every training forward, for the safety neurons of each layer, the masked max over tokens
(averaged over the batch's sequences) is anchored to its base reasoning reference:

    P = (1/n) * sum_j ((m_j - r_j) / max(|r_j|, floor))^2

so reasoning training cannot recruit (or silence) those neurons without paying for it. A MoE unit
is averaged over the sequences that routed a token to its expert; a unit no sequence of the batch
routed to has no value and adds nothing (its term is 0; ``n`` still counts it). Every
regularizer's gradient (this penalty's, the safety anchor's) joins the trainer's own backward pass
through the last decoder block's output (see :func:`attach_penalty`), whatever loss the trainer
computes, so no trainer subclass is needed. Custom loops take ``lambda * P`` from
:meth:`EntanglementPenalty.pop` instead.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rimguard import dist
from rimguard.hooks.capture import Activation
from rimguard.hooks.reduce import present_sum


class EntanglementPenalty:
    """Activation-anchoring penalty on the safety neurons; a :class:`~rimguard.hooks.capture.Tap`.

    Args:
        safety_per_source: per capture source, ``[n_s]`` safety unit ids (local to the source; empty where
            none), on the model's device (:meth:`~rimguard.hooks.capture.ActivationCapture.split`).
        reference: per source, ``[n_s]`` base reasoning activations (set by :meth:`set_reference`).
        floor: lower bound of the scale ``|r_j|``.
    """

    def __init__(self, safety_per_source: Sequence[torch.Tensor], floor: float = 1e-3) -> None:
        self.index = list(safety_per_source)
        self.total = sum(int(i.numel()) for i in self.index)
        self.reference: list[torch.Tensor] | None = None
        self.floor = floor
        self.weight = 0.0
        self._terms: list[torch.Tensor] = []
        self.logged_sum: torch.Tensor | None = None
        self.logged_count = 0

    def set_reference(self, per_layer: Sequence[torch.Tensor]) -> None:
        self.reference = [r.detach().float() for r in per_layer]

    @property
    def active(self) -> bool:
        return self.weight > 0 and self.reference is not None and self.total > 0

    def __call__(self, source: int, act: Activation, recompute: bool) -> None:
        if not self.active or self.index[source].numel() == 0:
            return
        assert self.reference is not None
        sums, count = present_sum(act.peak(self.index[source]))
        peak = sums / count.clamp_min(1)
        ref = self.reference[source]
        term = torch.where(count > 0, ((peak - ref) / ref.abs().clamp_min(self.floor)) ** 2, torch.zeros_like(peak)).sum()
        if not recompute:  # a checkpoint recomputation replays the ops but must not count twice
            self._terms.append(term)

    def pop(self) -> torch.Tensor | None:
        """The weighted penalty ``lambda * P`` of the forwards since the last pop (differentiable)."""
        if not self._terms:
            return None
        value = torch.stack(self._terms).sum() / self.total
        self._terms.clear()
        detached = value.detach()
        self.logged_sum = detached if self.logged_sum is None else self.logged_sum + detached
        self.logged_count += 1
        return self.weight * value

    def drain_logged(self) -> float | None:
        """Mean unweighted penalty since the last call, over all ranks (a collective: call on every rank)."""
        stats = torch.zeros(2)
        if self.logged_sum is not None:
            stats = torch.stack([self.logged_sum.float().cpu(), torch.tensor(float(self.logged_count))])
        total, count = dist.all_reduce_sum(stats).tolist()
        self.logged_sum, self.logged_count = None, 0
        return total / count if count else None


class _PenaltyGrad(torch.autograd.Function):
    """Identity on ``hidden``; in backward, also sends gradient ``coef`` into the scalar ``penalty``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, penalty: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # kept as an attribute, not saved: under activation checkpointing the recomputed block
        # does not re-tie, and a saved tensor would make the two passes save different counts
        ctx.coef = coef
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, ctx.coef.to(grad.dtype if grad.is_floating_point() else torch.float32), None


def attach_penalty(hidden: torch.Tensor, penalty: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Return ``hidden`` unchanged, tied so that backward through it adds ``coef * grad(penalty)``.

    Hooked onto the last decoder block's output, this puts the penalty into *the* backward pass
    of whatever loss the trainer computes from the model (the Trainer's, TRL's fused loss, a
    custom ``compute_loss``), without touching the loss value or subclassing the trainer.
    """
    if not penalty.requires_grad:
        raise RuntimeError(
            "rimguard: the entanglement penalty has no gradient. With activation checkpointing, use the non-reentrant "
            "form (gradient_checkpointing_kwargs={'use_reentrant': False})."
        )
    return _PenaltyGrad.apply(hidden, penalty, coef.detach())


