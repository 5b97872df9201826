"""The loss tie: how a regularizer's loss joins the backward pass the trainer runs, with lambda.

Regularizers need no trainer subclass. Each optimizer step's regularizer loss is tied to the last
decoder block's output of a training forward (an output tap of the capture), so its gradient joins
whatever backward the trainer runs from the model (HF's loss, TRL's fused loss, DPO, GRPO, a custom
``compute_loss``), without touching the loss value:

* a step loss (the safety anchor's, the parameter anchor's) is computed before the step's first
  forward and tied once, to that forward;
* a forward loss (the activation penalty) is tied to its own forward, divided by the number of
  micro-batches of the optimizer step (so gradient accumulation averages it like the trainer's loss).

Custom loops that add the loss themselves call :meth:`LossTie.take` instead. :class:`LossTie` is
also the one home of lambda, the regularizer's weight in force.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rimguard.actions.regularizer import Regularizer
from rimguard.saved import Saved

BackwardScale = Callable[[], "tuple[int, torch.Tensor | float]"]  # (micro-batches per optimizer step, loss scale)


class _TieGrad(torch.autograd.Function):
    """Identity on ``hidden``; in backward, also sends gradient ``coef`` into the scalar ``loss``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # kept as an attribute, not saved: under activation checkpointing the recomputed block
        # does not re-tie, and a saved tensor would make the two passes save different counts
        ctx.coef = coef
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, ctx.coef.to(grad.dtype if grad.is_floating_point() else torch.float32), None


def tie_loss(hidden: torch.Tensor, loss: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Return ``hidden`` unchanged, tied so that backward through it adds ``coef * grad(loss)``."""
    if not loss.requires_grad:
        raise RuntimeError(
            "rimguard: the regularizer's loss has no gradient. With activation checkpointing, use the non-reentrant "
            "form (gradient_checkpointing_kwargs={'use_reentrant': False})."
        )
    return _TieGrad.apply(hidden, loss, coef.detach())


class LossTie:
    """Weights a regularizer's loss by lambda and carries it into the trainer's backward.

    Args:
        regularizer: the run's regularizer, or None (nothing to tie).
        backward_scale: ``() -> (micro-batches in this optimizer step, loss scale)`` of the backward the
            tie joins (an fp16 ``GradScaler`` scales the trainer's loss; the tied loss must match).
    """

    def __init__(self, regularizer: Regularizer | None, backward_scale: BackwardScale) -> None:
        self.regularizer, self.backward_scale = regularizer, backward_scale
        self.reg_lambda = 0.0  # lambda in force
        self._pending: torch.Tensor | None = None  # this step's weighted step loss, until a forward takes it

    def set_lambda(self, value: float) -> None:
        self.reg_lambda = value
        if self.regularizer is not None:
            self.regularizer.active = value > 0

    def state_dict(self) -> Saved:
        return Saved(meta={"reg_lambda": self.reg_lambda})

    def load_state_dict(self, state: Saved) -> None:
        self.set_lambda(float(state.meta["reg_lambda"]))

    def begin_step(self, step: int) -> None:
        """Compute optimizer step ``step``'s step loss (before its first forward)."""
        self._pending = None
        if self.regularizer is not None and self.reg_lambda > 0:
            loss = self.regularizer.step_loss(step)
            self._pending = None if loss is None else self.reg_lambda * loss

    def end_step(self) -> None:
        self._pending = None  # a step whose forwards never took the step loss must not carry it over

    def take(self, per_micro_batch: bool = False) -> torch.Tensor | None:
        """The weighted loss since the last call: the last forward's loss (divided by the micro-batch count if
        ``per_micro_batch``) plus the pending step loss. For custom loops: add it to the loss."""
        if self.regularizer is None or self.reg_lambda <= 0:
            return None
        forward = self.regularizer.forward_loss()
        if forward is not None and per_micro_batch:
            forward = forward / self.backward_scale()[0]
        parts = [t for t in (None if forward is None else self.reg_lambda * forward, self._pending) if t is not None]
        self._pending = None
        return torch.stack(parts).sum() if parts else None

    def __call__(self, block: nn.Module, output: Any) -> Any:
        """Output tap on the last decoder block of a training forward: tie the weighted loss to its output."""
        loss = self.take(per_micro_batch=True)
        if loss is None:  # most forwards: nothing to tie, no work
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        tied = tie_loss(hidden, loss, torch.as_tensor(self.backward_scale()[1], device=hidden.device))
        return (tied, *output[1:]) if isinstance(output, tuple) else tied
