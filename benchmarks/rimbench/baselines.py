"""What a practitioner would do instead of the guard, at the same data, steps and evaluation.

* **Replay** (:func:`replay_mix`): safety rows mixed into the SFT data, either the safety anchor's own
  rows at the anchor's rate (its prompts with the base model's responses, as plain SFT rows) or the
  model's own refusals as a small share of the rows.
* **KL to the base model on the training tokens** (:class:`KLToBase`): the ASFT recipe, ``loss = CE +
  beta * KL(pi_0 || pi_theta)`` on the completion tokens of each training batch, with a frozen copy of
  the base model.
* **Weight EMA** (:class:`WeightEMA`): an exponential moving average of the trainable weights, the
  zero-data baseline; the EMA weights are what is evaluated.

:func:`baseline` sets one of them up for a run (the study runner and the step-time benchmark share it).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

ASFT_BETA = 0.1  # KL weight of kl-train: the ASFT authors' train.sh default, and LLaMA-Factory's asft_alpha
EMA_DECAY = 0.99  # weight EMA of the ema baseline
ANCHOR_ROWS_PER_STEP = 8 / 4  # the default anchor's budget: 8 rows every 4 optimizer steps
BASELINES = ("replay-anchor-budget", "replay-3pct", "kl-train", "ema")


def replay_mix(main: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]], count: int, seed: int) -> list[dict[str, Any]]:
    """``main`` plus ``count`` rows of ``extra`` (cycled in a ``seed``-shuffled order), shuffled together.

    Every row of ``main`` is kept once; ``extra`` rows repeat only when ``count > len(extra)``.
    """
    if count and not extra:
        raise ValueError("nothing to replay")
    pool = list(extra)
    rng = random.Random(seed)
    rng.shuffle(pool)
    rows = list(main) + [pool[k % len(pool)] for k in range(count)]
    rng.shuffle(rows)
    return rows


def kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the completion tokens of ``KL(pi_0 || pi_theta)`` per token, in nats (differentiable in ``logits``).

    Args:
        logits, base_logits: ``[B, T, V]`` of the model being trained and of the frozen base model.
        labels: ``[B, T]``; positions with ``-100`` are not trained on (the prompt, padding). Position ``t``'s
            logits predict ``labels[:, t + 1]``, as in the causal-LM loss.
    """
    keep = (labels[:, 1:] != -100).to(logits.dtype)
    logp = logits[:, :-1].float().log_softmax(-1)
    base = base_logits[:, :-1].float().log_softmax(-1)
    per_token = (base.exp() * (base - logp)).sum(-1)
    return (per_token * keep).sum() / keep.sum().clamp_min(1)


class KLToBase:
    """Adds ``beta * KL(pi_0 || pi_theta)`` on the training tokens to a Trainer's loss (see :func:`kl_to_base`).

    Use it as ``compute_loss`` of a Trainer subclass, through :func:`with_kl_to_base`. The base model is a
    frozen copy of the model as given, moved to the training batches' device at the first step.
    """

    def __init__(self, model: nn.Module, beta: float) -> None:
        import copy

        self.beta = beta
        self.base = copy.deepcopy(model).eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.logged: list[float] = []

    def __call__(self, model: nn.Module, inputs: dict[str, Any], loss: torch.Tensor, outputs: Any) -> torch.Tensor:
        device = inputs["input_ids"].device
        if next(self.base.parameters()).device != device:  # the Trainer moved the model, after the copy was taken
            self.base.to(device)
        with torch.no_grad():
            base_logits = self.base(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits
        kl = kl_to_base(outputs.logits, base_logits, inputs["labels"])
        self.logged.append(float(kl.detach()))
        return loss + self.beta * kl


def with_kl_to_base(trainer_cls: type, kl: KLToBase) -> type:
    """A subclass of ``trainer_cls`` whose ``compute_loss`` adds ``kl`` to the trainer's own loss."""

    class KLTrainer(trainer_cls):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            loss = kl(model, inputs, loss, outputs)
            return (loss, outputs) if return_outputs else loss

    return KLTrainer


class WeightEMA(TrainerCallback):
    """An exponential moving average of the trainable weights, updated after every optimizer step:
    ``ema = decay * ema + (1 - decay) * theta``. :meth:`swapped` puts the EMA weights in the model for a block."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.params: list[nn.Parameter] = []
        self.shadow: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        for s, p in zip(self.shadow, self.params):
            s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The EMA weights in the model while the block runs; the trained weights back after."""
        held = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, h in zip(self.params, held):
                    p.copy_(h)


@dataclass
class Baseline:
    """How a baseline changes one training run.

    Attributes:
        trainer_cls: the trainer class to build (``kl-train``: with the KL term in its loss).
        batch: rows per optimizer step (``replay-anchor-budget``: the anchor's extra rows on top).
        callbacks: to add to the trainer (``ema``: the average, updated after every step).
        kl, ema: the KL term and the weight average, when the variant has them.
    """

    trainer_cls: type
    batch: int
    callbacks: list[TrainerCallback] = field(default_factory=list)
    kl: KLToBase | None = None
    ema: WeightEMA | None = None


def baseline(variant: str, model: nn.Module, trainer_cls: type, batch: int) -> Baseline:
    """The run set-up of ``variant`` (one of :data:`BASELINES`; anything else trains as given).

    ``replay-anchor-budget`` trains :data:`ANCHOR_ROWS_PER_STEP` more rows per step, the anchor's compute;
    ``replay-3pct`` trains the same number of rows as the unguarded run (3% of them replaced), so only its
    data differ; ``kl-train`` runs the frozen base model's forward on every batch; ``ema`` updates the average
    after every optimizer step. ``batch`` is the unguarded run's rows per step.
    """
    if variant == "kl-train":
        kl = KLToBase(model, ASFT_BETA)
        return Baseline(with_kl_to_base(trainer_cls, kl), batch, kl=kl)
    if variant == "ema":
        ema = WeightEMA(EMA_DECAY)
        return Baseline(trainer_cls, batch, [ema], ema=ema)
    extra = round(ANCHOR_ROWS_PER_STEP) if variant == "replay-anchor-budget" else 0
    return Baseline(trainer_cls, batch + extra)
