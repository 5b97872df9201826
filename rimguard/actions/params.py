"""Parameter anchoring (``regularizer="params"``, L2-SP).

``sum (theta - theta_0)^2`` over the trainable parameters (under LoRA, the adapter factors, pulled
back to their initial values), or, with ``param_scope="safety"``, only over the slices the safety
neurons own (:meth:`rimguard.actions.freeze.NeuronFreezer.targets`). It keeps a copy of the anchored
parameters, and is a step loss: computed once per optimizer step and tied into its backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.actions.anchor import AnchorError
from rimguard.actions.regularizer import BuildContext, Regularizer
from rimguard.saved import Saved


class ParamAnchor(Regularizer):
    """L2-SP: ``sum (theta - theta_0)^2`` over the anchored parameters or parameter slices.

    Args:
        slices: ``(param, indexer)`` pairs: ``param[indexer]`` is anchored (``()``: the whole parameter).
    """

    name = "params"
    default_lambda = 10.0

    def __init__(self, slices: Sequence[tuple[nn.Parameter, tuple]]) -> None:
        self.slices = [(p, tuple(i.to(p.device) if isinstance(i, torch.Tensor) else i for i in at))
                       for p, at in slices if p.requires_grad]
        self.start = [p[at].detach().clone() for p, at in self.slices]
        self._logged: torch.Tensor | None = None

    @classmethod
    def build(cls, ctx: BuildContext) -> "ParamAnchor":
        if ctx.config.actions.param_scope == "all":
            slices = [(p, ()) for p in ctx.model.parameters() if p.requires_grad]
        else:
            slices = [(p, at) for layer, ids in zip(ctx.capture.layers, ctx.atlas.safety_per_layer()) if ids.numel()
                      for p, at, _, _ in ctx.freezer.targets(layer, ids)]
        anchor = cls(slices)
        if ctx.restored is not None:
            anchor.load_state_dict(ctx.restored)
        return anchor

    def step_loss(self, step: int) -> torch.Tensor:
        return self.loss()

    def loss(self) -> torch.Tensor:
        """Differentiable ``sum (theta - theta_0)^2``, a ``[]`` tensor."""
        terms = [(p[at] - s).pow(2).sum() for (p, at), s in zip(self.slices, self.start)]
        value = torch.stack(terms).sum()
        logged = torch.stack([value.detach().float(), torch.ones((), device=value.device)])
        self._logged = logged if self._logged is None else self._logged + logged
        return value

    def logged(self) -> dict[str, float]:
        """Mean ``param_dist2`` (the unweighted sum of squares) since the last call, over ranks."""
        stats = self._logged.cpu() if self._logged is not None else torch.zeros(2)
        self._logged = None
        total, count = dist.all_reduce_sum(stats).tolist()
        return {"param_dist2": total / count} if count else {}

    def state_dict(self) -> Saved:
        return Saved({str(k): s.cpu() for k, s in enumerate(self.start)})

    def load_state_dict(self, state: Saved) -> None:
        tensors = state.tensors
        if len(tensors) != len(self.start) or any(str(k) not in tensors or tensors[str(k)].shape != s.shape
                                                  for k, s in enumerate(self.start)):
            raise AnchorError(f"the parameter-anchor state ({len(tensors)} tensors) does not match the {len(self.start)} "
                              "anchored parameters of this model (another model, param_scope or LoRA setting)")
        self.start = [tensors[str(k)].to(s.device, s.dtype) for k, s in enumerate(self.start)]
