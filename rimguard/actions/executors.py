"""What each policy action does when its level's plan runs: one executor per action.

``regularize`` sets lambda (:meth:`rimguard.engine.GuardEngine.execute`); ``warn`` is the check's own
warning. The others act on the model or ask the training loop for something (a checkpoint, a stop)
through the check's :class:`~rimguard.engine.Report`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from rimguard import dist
from rimguard.atlas.selection import top_fraction
from rimguard.policy import Plan, Report

if TYPE_CHECKING:
    from rimguard.engine import GuardEngine

logger = logging.getLogger("rimguard")
Executor = Callable[["GuardEngine", Plan, int, "Report | None"], None]


def freeze(engine: "GuardEngine", per_layer: Sequence[torch.Tensor], step: int, which: str) -> None:
    """Freeze ``per_layer`` neuron ids and log what was added."""
    added = engine.freezer.freeze(per_layer)
    if added:
        engine.events.write({"event": "freeze", "step": step, "which": which, "added": added, "frozen": engine.freezer.count})
        if dist.is_main():
            logger.warning("rimguard: froze %d safety neurons at step %d (%d frozen in all)", added, step, engine.freezer.count)


def _nothing(engine: "GuardEngine", plan: Plan, step: int, report: Report | None) -> None:
    """'warn' and 'regularize' need no executor: warnings are logged by the check, lambda by the engine."""


def _freeze_set(engine: "GuardEngine", plan: Plan, step: int, report: Report | None) -> None:
    """Freeze the atlas' safety neurons, or the ``freeze_share`` of all neurons ranked by the atlas."""
    share = engine.config.actions.freeze_share
    per_layer = engine.atlas.top_share_per_layer(share) if share else engine.atlas.safety_per_layer()
    freeze(engine, per_layer, step, f"share {share:g}" if share else "all")


def _freeze_top(engine: "GuardEngine", plan: Plan, step: int, report: Report | None) -> None:
    """Freeze the most shifted ``freeze_top_fraction`` of the safety neurons (unless 'freeze' takes them all)."""
    if "freeze" in plan.actions or not engine.monitor.ready():
        return
    chosen = top_fraction(engine.monitor.shift_per_neuron().cpu(), engine.config.actions.freeze_top_fraction)
    neurons = engine.atlas.safety_neurons()
    freeze(engine, [neurons[chosen & (neurons[:, 0] == layer), 1] for layer in range(len(engine.atlas.layer_sizes))], step, "top")


def _checkpoint(engine: "GuardEngine", plan: Plan, step: int, report: Report | None) -> None:
    """Ask the loop for one checkpoint (the first time the level reaches a checkpointing level)."""
    if report is not None and not engine.policy.checkpointed:
        report.save = engine.policy.checkpointed = True


def _stop(engine: "GuardEngine", plan: Plan, step: int, report: Report | None) -> None:
    if report is not None:
        report.stop = True
        engine.events.write({"event": "stop", "step": step, "level": plan.level})


EXECUTORS: dict[str, Executor] = {
    "warn": _nothing, "regularize": _nothing, "freeze": _freeze_set, "freeze_top": _freeze_top,
    "checkpoint": _checkpoint, "stop": _stop,
}
