"""The regularizer protocol: what every ``regularize`` action implements.

A regularizer adds a loss term to training. Its term is either

* a **step loss** (:meth:`Regularizer.step_loss`): computed once per optimizer step, before the
  step's first forward (the safety anchor's batch, the parameter anchor's distance), or
* a **forward loss** (:meth:`Regularizer.forward_loss`): built during each training forward from
  the capture's taps (the activation penalty), taken after that forward;

and :class:`rimguard.actions.tie.LossTie` weights it by lambda and ties it into the trainer's
backward. A regularizer knows nothing of lambda or of the policy; it only says whether it is
``active`` (lambda > 0), so that it does no work otherwise.

Adding one is a new module in :mod:`rimguard.actions` with a subclass, and a line in
:data:`rimguard.actions.REGULARIZERS` (or :func:`rimguard.actions.register` from your code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from rimguard.atlas import NeuronAtlas
from rimguard.hooks.capture import ActivationCapture
from rimguard.probes import ProbeSources
from rimguard.saved import Saved

BACKENDS = ("single", "ddp", "deepspeed", "fsdp", "zero3")  # one process, DDP, DeepSpeed ZeRO-1/2, or sharded (FSDP2, ZeRO-3)


@dataclass
class BuildContext:
    """What a regularizer may read when it is built (at the guard's set-up).

    Attributes:
        model, tokenizer: the model the training loop calls, and its tokenizer.
        capture: the hook layer (attached; its ``tracked`` neurons are the atlas').
        atlas: the neuron atlas.
        config: the guard's :class:`~rimguard.config.GuardConfig`.
        monitor: the :class:`~rimguard.signals.monitor.EntanglementMonitor` (references started).
        freezer: the :class:`~rimguard.actions.freeze.NeuronFreezer` (for the slices a neuron owns).
        sources: the guard's prompt sources.
        restored: this regularizer's :class:`Saved` state from a checkpoint, or None for a fresh run.
    """

    model: nn.Module
    tokenizer: Any
    capture: ActivationCapture
    atlas: NeuronAtlas
    config: Any
    monitor: Any
    freezer: Any
    sources: ProbeSources
    restored: Saved | None

    def safety_per_source(self) -> list[torch.Tensor]:
        """Per capture source, its ``[n_s]`` safety unit ids (local to the source), on the model's device."""
        device = self.monitor.device
        return [ids for ids, _ in self.capture.split([i.to(device) for i in self.atlas.safety_per_layer()])]


class Regularizer:
    """Base class of the ``regularize`` actions (every method has a do-nothing default).

    Class attributes:
        name: the ``GuardConfig.regularizer`` value that selects it.
        default_lambda: lambda when ``reg_lambda`` is None.
        backends: the training backends it works under (:data:`BACKENDS`).
    Instance attribute:
        optimises: the logged signals it acts on directly (they cannot witness its success).
    """

    name: ClassVar[str] = ""
    default_lambda: ClassVar[float] = 1.0
    backends: ClassVar[tuple[str, ...]] = ("single", "ddp")
    optimises: tuple[str, ...] = ()
    active: bool = False  # lambda > 0: set by the loss tie

    @classmethod
    def build(cls, ctx: BuildContext) -> "Regularizer":
        """The regularizer for this run (restored from ``ctx.restored`` when resuming)."""
        raise NotImplementedError

    @classmethod
    def supports(cls, backend: str) -> bool:
        return backend in cls.backends

    def step_loss(self, step: int) -> torch.Tensor | None:
        """The unweighted loss of optimizer step ``step`` (0-based), differentiable, or None."""
        return None

    def forward_loss(self) -> torch.Tensor | None:
        """The unweighted loss built during the last training forward, differentiable, or None."""
        return None

    def logged(self) -> dict[str, float]:
        """Values to log at a check (means since the last check, over ranks: a collective, called on every rank)."""
        return {}

    def state_dict(self) -> Saved:
        return Saved()
