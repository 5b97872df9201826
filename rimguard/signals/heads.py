"""Refusal-head monitor: the refusal heads' attention on a reasoning span, against train start.

The atlas' refusal heads (:mod:`rimguard.atlas.heads`) attend away from the reasoning at the answer
position when the aligned model refuses. Reasoning training that pulls them back onto the reasoning is
a second path to forgetting (besides the safety neurons). At each check this monitor runs the first
``head_probes`` safety probes, each with the atlas' reasoning passage before the answer, and logs

* ``refusal_head_mass``: the heads' mean attention mass on the span at the answer position (a share
  of their attention, in [0, 1]);
* ``refusal_head_shift``: its change since train start (the reference is taken at setup on the
  weights being trained, and saved with the guard's state).

Nothing runs per training step. Under DDP each rank measures its share of the probes and the sums are
all-reduced, so every rank logs the same values (every rank runs every probe under sharded parameters).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rimguard import dist
from rimguard.atlas import NeuronAtlas
from rimguard.atlas.heads import answer_attention, with_reasoning
from rimguard.config import GuardConfig
from rimguard.hooks.arch import MLPLayer
from rimguard.passes import model_device, pad_id
from rimguard.saved import Saved
from rimguard.state import GuardStateError

logger = logging.getLogger("rimguard")


class RefusalHeadMonitor:
    """Measures the atlas' first ``config.atlas.refusal_heads`` refusal heads (see module docstring).

    Args:
        model: the module the training loop calls.
        layers: its decoder layers (:func:`rimguard.hooks.arch.find_mlp_layers`).
        tokenizer: its tokenizer.
        atlas: an atlas with refusal heads.
        config: guard configuration.
    """

    def __init__(self, model: nn.Module, layers: list[MLPLayer], tokenizer, atlas: NeuronAtlas, config: GuardConfig) -> None:
        if atlas.heads is None or not atlas.num_heads:
            raise ValueError("the atlas holds no refusal heads")
        self.model, self.layers, self.config = model, layers, config
        self.device = model_device(model)
        heads = atlas.heads.heads[: config.atlas.refusal_heads]
        self.record = sorted(set(heads[:, 0].tolist()))  # the decoder layers that hold a monitored head
        self.layer_pos = torch.tensor([self.record.index(layer) for layer in heads[:, 0].tolist()], device=self.device)
        self.head = heads[:, 1].to(self.device)
        # within the monitor's probes, which setup keeps apart from the anchor's prompts
        count = min(config.monitor.head_probes, config.monitor.check_probes, config.atlas.num_safety_probes)
        self.prompts = with_reasoning(model, tokenizer, atlas.probe_prompts[:count], atlas.reasoning_spans, config.atlas.max_length)
        self._pad = pad_id(tokenizer)
        self.ref_mass: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, layers: list[MLPLayer], tokenizer, atlas: NeuronAtlas, config: GuardConfig,
              restored: Saved | None, resumed: bool) -> "RefusalHeadMonitor | None":
        """The started monitor when ``refusal_heads > 0`` and the atlas holds heads, else None (with a warning
        when heads were asked for). Its reference comes from ``restored`` if it holds one, else it is taken now."""
        if not config.atlas.refusal_heads:
            return None
        if not atlas.num_heads:
            why = ("no head was eligible when it was identified" if atlas.heads is not None else
                   "it was identified without them; identify it again with refusal_heads > 0")
            logger.warning("rimguard: refusal_heads=%d, but the atlas holds no refusal heads (%s): the heads are not monitored",
                           config.atlas.refusal_heads, why)
            return None
        heads = cls(model, layers, tokenizer, atlas, config)
        saved = restored.tensors.get("ref_mass") if restored is not None else None
        if saved is not None and saved.numel() != heads.count:
            raise GuardStateError(f"the checkpoint's guard state holds references of {saved.numel()} refusal heads; "
                                  f"this configuration monitors {heads.count} (refusal_heads changed): resume with the "
                                  "refusal_heads it was trained with")
        if resumed and saved is None:
            logger.warning("rimguard: the checkpoint's guard state has no refusal-head reference (saved without "
                           "refusal_heads); it is taken now, so refusal_head_shift measures drift since this resume")
        heads.ref_mass = saved.to(heads.device) if saved is not None else heads.mass()
        return heads

    @property
    def count(self) -> int:
        """Number of monitored heads."""
        return int(self.head.numel())

    def mass(self) -> torch.Tensor:
        """``[k]`` float32: each monitored head's attention mass on the span at the answer position, averaged
        over the probes (of every rank)."""
        mine = dist.shard(self.prompts)
        total = torch.zeros(self.count, device=self.device)
        if len(mine):
            mass, _ = answer_attention(self.model, self.layers, mine, self._pad, self.record, self.config.monitor.probe_batch_size)
            total = mass[:, self.layer_pos, self.head].sum(0)
        count = torch.tensor(float(len(mine)), device=self.device)
        return dist.sum_shards(total) / dist.sum_shards(count).clamp_min(1)

    def measure(self) -> dict[str, float]:
        """``refusal_head_mass`` (the heads' mean span mass now, a share in [0, 1]) and ``refusal_head_shift``
        (its change since the reference, in the same units); one probe pass, one host sync."""
        assert self.ref_mass is not None
        now = self.mass()
        values = torch.stack([now.mean(), (now - self.ref_mass).mean()]).tolist()
        return {"refusal_head_mass": values[0], "refusal_head_shift": values[1]}

    def state_dict(self) -> Saved:
        """What a resume needs: ``ref_mass`` ``[k]`` float32 on the CPU (what :meth:`build` takes back)."""
        assert self.ref_mass is not None
        return Saved({"ref_mass": self.ref_mass.detach().cpu()})
