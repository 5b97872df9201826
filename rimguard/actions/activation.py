"""The activation penalty (``regularizer="activation"``): the safety-critical neurons' activations on the
training batch held at their base values.

On every training forward, for the safety neurons of each layer, the masked max over tokens
(averaged over the batch's sequences) is anchored to its base reasoning reference:

    P = (1/n) * sum_j ((m_j - r_j) / max(|r_j|, floor))^2

so reasoning training cannot recruit (or silence) those neurons without paying for it. The
reference ``r`` is the monitor's base task reference: the given task probes, or the first optimizer
step's stream (so the penalty starts on step 2, whatever the check schedule). A MoE unit is averaged
over the sequences that routed a token to its expert; a unit no sequence of the batch routed to has
no value and adds nothing (its term is 0; ``n`` still counts it). It is a forward loss
(:mod:`rimguard.actions.regularizer`), tied into each training forward's backward by the loss tie.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rimguard import dist
from rimguard.actions.regularizer import BACKENDS, BuildContext, Regularizer
from rimguard.hooks.capture import Activation
from rimguard.hooks.reduce import present_sum

# the monitor's signals this penalty drives directly (it holds the safety neurons' activations)
NEURON_SIGNALS = ("ras_safe", "safety_drop", "task_rise", "entanglement_z", "entanglement_pct")


class ActivationPenalty(Regularizer):
    """Activation-anchoring penalty on the safety neurons; a ``"train"`` :class:`~rimguard.hooks.capture.Tap`.

    Args:
        safety_per_source: per capture source, ``[n_s]`` safety unit ids (local to the source; empty where
            none), on the model's device (:meth:`~rimguard.hooks.capture.ActivationCapture.split`).
        reference: ``() -> per source [n_s] base task activations``, or None while the monitor has none yet.
        floor: lower bound of the scale ``|r_j|``.
    """

    name = "activation"
    backends = BACKENDS  # reads the live activations only: works wherever the forward runs
    optimises = NEURON_SIGNALS

    def __init__(self, safety_per_source: Sequence[torch.Tensor], reference: Callable[[], list[torch.Tensor] | None],
                 floor: float = 1e-3) -> None:
        self.index = list(safety_per_source)
        self.total = sum(int(i.numel()) for i in self.index)
        self._reference_of = reference
        self.reference: list[torch.Tensor] | None = None
        self.floor = floor
        self._terms: list[torch.Tensor] = []
        self.logged_sum: torch.Tensor | None = None
        self.logged_count = 0

    @classmethod
    def build(cls, ctx: BuildContext) -> "ActivationPenalty":
        monitor, capture, atlas = ctx.monitor, ctx.capture, ctx.atlas
        layer_of = atlas.safety_neurons()[:, 0]  # [n]: each safety neuron's layer, in the atlas' order
        by_layer = [atlas.safety[layer_of == layer] for layer in range(len(capture.layers))]  # their rows of the tracked vector
        split = capture.split(atlas.safety_per_layer())  # per source: (local ids, positions in its layer's list)
        rows = [by_layer[src.layer][pos].to(monitor.device) for src, (_, pos) in zip(capture.sources, split)]

        def reference() -> list[torch.Tensor] | None:  # a gather: no host sync inside the hook that calls it
            return None if monitor.ref_task is None else [monitor.ref_task[r] for r in rows]

        penalty = cls([ids.to(monitor.device) for ids, _ in split], reference)
        capture.add_tap(penalty, on="train")
        return penalty

    def __call__(self, source: int, act: Activation, recompute: bool) -> None:
        if not self.active or self.total == 0 or self.index[source].numel() == 0:
            return
        if self.reference is None:
            reference = self._reference_of()
            if reference is None:  # before the monitor's base reference exists (the first optimizer step)
                return
            self.reference = [r.detach().float() for r in reference]
        sums, count = present_sum(act.peak(self.index[source]))
        peak = sums / count.clamp_min(1)
        ref = self.reference[source]
        term = torch.where(count > 0, ((peak - ref) / ref.abs().clamp_min(self.floor)) ** 2, torch.zeros_like(peak)).sum()
        if not recompute:  # a checkpoint recomputation replays the ops but must not count twice
            self._terms.append(term)

    def forward_loss(self) -> torch.Tensor | None:
        """The penalty ``P`` of the last training forward (differentiable), or None."""
        if not self._terms:
            return None
        value = torch.stack(self._terms).sum() / self.total
        self._terms.clear()
        detached = value.detach()
        self.logged_sum = detached if self.logged_sum is None else self.logged_sum + detached
        self.logged_count += 1
        return value

    def logged(self) -> dict[str, float]:
        """Mean ``activation_penalty`` since the last call, over all ranks (a collective: call on every rank)."""
        stats = torch.zeros(2)
        if self.logged_sum is not None:
            stats = torch.stack([self.logged_sum.float().cpu(), torch.tensor(float(self.logged_count))])
        total, count = dist.all_reduce_sum(stats).tolist()
        self.logged_sum, self.logged_count = None, 0
        return {"activation_penalty": total / count} if count else {}
