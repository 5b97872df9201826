"""Freezing: holding chosen MLP neurons fixed through optimizer steps.

A neuron ``j`` of layer ``l`` owns rows ``j + c*I`` of the input-side projections (and their bias)
and column ``j`` of the down projection (transposed for GPT-2's Conv1D). At freeze time those
slices are snapshotted; their gradients are zeroed by tensor hooks (registered through the hook
layer), and after every optimizer step the snapshot is written back, which holds against AdamW
momentum and decoupled weight decay bit for bit. Under PEFT LoRA the frozen neurons' current delta
``s * B @ A`` is first merged into the (untrained) base weight, then the matching rows of
``lora_B`` (input side) and columns of ``lora_A`` (down side) are set to zero and held there, so
the merged weight of a frozen neuron never changes again.

A MoE unit ``j`` of expert ``e`` owns that expert's gate and up rows of the stacked ``gate_up_proj``
(and its bias) and column ``j`` of its ``down_proj`` (:meth:`rimguard.hooks.arch.ExpertBank.slices`);
they are held the same way, expert by expert, the other experts' slices untouched. Expert weights
adapted by LoRA ``target_parameters`` cannot be frozen per unit (the delta is a low-rank product
over all units) and are refused.

Every slice is a parameter and an *indexer*, ``param[indexer]`` (a tuple of index tensors and
full slices), so one mechanism covers rows, columns and per-expert slices.

Under sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3) each rank holds and restores the part of
every slice that lies in its shard (the indexer becomes the flat positions of that part in the local
shard, found once at freeze time, so that no step needs a host sync). Under FSDP2 the frozen gradients
are zeroed on the local shard before the optimizer step (:meth:`mask_sharded_grads`), as FSDP2 sets
sharded gradients outside autograd's tensor hooks; under ZeRO-3, whose optimizer keeps its own fp32
partition and steps inside the engine's backward, the restore writes that partition too (under
ZeRO-1/2 each rank holds whole parameters, written back as on one process after every step). A
gradient-norm clip that runs before that (the Trainer's ``max_grad_norm``) still counts the frozen
gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.hooks.arch import MLPLayer, Projection, UnsupportedModelError
from rimguard.hooks.capture import ActivationCapture
from rimguard.saved import Saved

logger = logging.getLogger("rimguard")

Indexer = tuple  # of index tensors and full slices: param[indexer]
EVERY = slice(None)


@dataclass
class _Slice:
    param: nn.Parameter
    indexer: Indexer | torch.Tensor  # an indexer, or (sharded) the flat positions in the parameter's local shard
    value: torch.Tensor
    whole: tuple[Indexer, torch.Tensor] | None = None  # ZeRO-3: the global indexer and values, for a gathered copy


def along(dim: int, index: torch.Tensor) -> Indexer:
    """The indexer of ``index`` along ``dim`` of a 2-D weight."""
    return (index,) if dim == 0 else (EVERY, index)


def on_device(indexer: Indexer, device: torch.device) -> Indexer:
    return tuple(i.to(device) if isinstance(i, torch.Tensor) else i for i in indexer)


def local_index(param: torch.Tensor, indexer: Indexer) -> Indexer | torch.Tensor:
    """``indexer`` on ``param``'s device; for a sharded parameter, the ``[k]`` flat positions of its slice in the
    rank's local shard (:func:`rimguard.dist.local`)."""
    if not dist.is_sharded(param):
        return on_device(indexer, param.device)
    whole = torch.zeros(dist.shape(param), dtype=torch.bool)
    whole[indexer] = True
    return dist.local_part(whole, param).reshape(-1).nonzero().squeeze(1).to(dist.local(param).device)


def read(param: torch.Tensor, at: Indexer | torch.Tensor) -> torch.Tensor:
    """The values of ``param`` at ``at`` (a :func:`local_index`), detached."""
    return dist.local(param).detach().view(-1)[at] if dist.is_sharded(param) else param.detach()[at]


@torch.no_grad()
def write(param: torch.Tensor, at: Indexer | torch.Tensor, value: torch.Tensor | float,
          whole: tuple[Indexer, torch.Tensor] | None = None) -> None:
    """Set ``param`` at ``at`` (a :func:`local_index`) to ``value``. ``whole``: the global indexer and values, written
    into a ZeRO-3 parameter's gathered copy when it holds one (a persistent parameter keeps the copy between steps)."""
    if not dist.is_sharded(param):
        param[at] = value
        return
    dist.set_local(param, at, torch.as_tensor(value, device=at.device).expand(at.shape))
    if whole is not None and param.numel() == dist.shape(param).numel():
        param.data[whole[0]] = whole[1]


def _lora_parts(module: nn.Module, name: str) -> list[nn.Module]:
    parts = getattr(module, name, None)
    return list(parts.values()) if isinstance(parts, nn.ModuleDict) else []


def _neuron_rows(proj: Projection, neurons: torch.Tensor, size: int) -> torch.Tensor:
    copies = proj.out_features // size
    return torch.cat([neurons + c * size for c in range(copies)])


class NeuronFreezer:
    """Holds chosen MLP neurons fixed through optimizer steps (full fine-tuning and LoRA).

    Args:
        capture: the hook layer (its layers are the MLPs; the gradient masks are registered through it).
    """


    def __init__(self, capture: ActivationCapture) -> None:
        self.capture = capture
        self.layers = list(capture.layers)
        self.frozen: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long) for _ in self.layers]
        self._slices: list[_Slice] = []
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._grad_index: dict[int, list[Indexer]] = {}
        self.merged_base: dict[str, torch.Tensor] = {}
        self.held = True  # restore() ran since the step began
        self._warned = False

    @property
    def count(self) -> int:
        return sum(int(f.numel()) for f in self.frozen)

    def targets(self, layer: MLPLayer, neurons: torch.Tensor) -> list[tuple[nn.Parameter, Indexer, Projection | None, str]]:
        """``(param, indexer, projection, role)`` of every slice that ``neurons`` (layer ids) own;
        the projection is None for expert weights."""
        out: list[tuple[nn.Parameter, Indexer, Projection | None, str]] = []
        bank = layer.experts
        if bank is not None:
            units = neurons[neurons < bank.units]
            if units.numel():
                if bank.adapted:
                    raise UnsupportedModelError(f"{bank.name}: its expert weights are adapted by LoRA target_parameters; "
                                                "freezing expert units needs full fine-tuning of the experts")
                out.extend((getattr(bank.module, name), indexer, None, "base") for name, indexer in bank.slices(units))
        if layer.down is None:
            return out
        local = neurons[neurons >= layer.dense_offset] - layer.dense_offset
        if local.numel() == 0:
            return out
        dense = layer.size - layer.dense_offset
        for proj in layer.inputs:
            rows = _neuron_rows(proj, local, dense)
            base = proj.base
            out.append((base.weight, along(1 if proj.transposed else 0, rows), proj, "base"))
            if getattr(base, "bias", None) is not None:
                out.append((base.bias, (rows,), proj, "bias"))
            out.extend((lora.weight, (rows,), proj, "lora") for lora in _lora_parts(proj.module, "lora_B"))
        down = layer.down
        out.append((down.base.weight, along(0 if down.transposed else 1, local), down, "base"))
        out.extend((lora.weight, (EVERY, local), down, "lora") for lora in _lora_parts(down.module, "lora_A"))
        return out

    @torch.no_grad()
    def _merge_lora(self, proj: Projection, indexer: Indexer) -> None:
        """Move the LoRA delta of the given base-weight slice into the base weight."""
        module = proj.module
        adapters = [k for k in getattr(module, "lora_A", {}) if hasattr(module, "get_delta_weight")]
        if not adapters:
            return
        weight = proj.base.weight
        at = on_device(indexer, weight.device)
        for adapter in adapters:
            delta = module.get_delta_weight(adapter).to(weight.dtype)
            weight[at] += delta[at]
        self.merged_base[proj.name] = weight.detach().clone().cpu()

    def freeze(self, per_layer: Sequence[torch.Tensor]) -> int:
        """Freeze more neurons (``[n_l]`` layer ids per layer); returns how many were new."""
        added = 0
        for pos, (layer, ids) in enumerate(zip(self.layers, per_layer)):
            new = ids[~torch.isin(ids.cpu(), self.frozen[pos])].cpu().unique()
            if new.numel() == 0:
                continue
            targets = self.targets(layer, new)
            added += int(new.numel())
            self.frozen[pos] = torch.cat([self.frozen[pos], new])
            for param, indexer, proj, role in targets:  # LoRA: merge first, then zero the factors
                if role == "base" and proj is not None and not param.requires_grad:
                    self._merge_lora(proj, indexer)
            for param, indexer, proj, role in targets:
                if role == "lora" and dist.is_sharded(param):
                    raise UnsupportedModelError("freezing LoRA-adapted neurons under sharded parameters is not supported; "
                                                "use mode='regularize' (the safety anchor), or full fine-tuning")
                at = local_index(param, indexer)
                if role == "lora":
                    write(param, at, 0.0)
                if not param.requires_grad:
                    continue
                whole = (on_device(indexer, param.device), dist.full(param)[indexer].clone()) if dist.gathers(param) else None
                self._slices.append(_Slice(param, at, read(param, at).clone(), whole))
                self._mask_grad(param, at)
        return added

    def _mask_grad(self, param: nn.Parameter, indexer: Indexer | torch.Tensor) -> None:
        key = id(param)
        self._grad_index.setdefault(key, []).append(indexer)
        if key in self._hooks or dist.is_sharded(param):  # sharded: see mask_sharded_grads
            return
        entries = self._grad_index[key]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            for at in entries:
                grad[at] = 0.0
            return grad

        self._hooks[key] = self.capture.grad_hook(param, hook)

    @torch.no_grad()
    def mask_sharded_grads(self) -> None:
        """Zero the frozen slices of sharded parameters' local gradients (after the backward, before the step)."""
        for s in self._slices:
            grad = s.param.grad
            if grad is not None and dist.is_sharded(grad):
                dist.local(grad).view(-1)[s.indexer] = 0.0

    @torch.no_grad()
    def restore(self) -> None:
        """Write the frozen slices back (call after every optimizer step)."""
        for s in self._slices:
            write(s.param, s.indexer, s.value, s.whole)
        self.held = True

    def begin_step(self) -> None:
        self.held = False

    def end_step(self, step: int) -> bool:
        """At the end of an optimizer step: if frozen neurons exist and :meth:`restore` did not run since the step
        began (a custom loop that never calls ``after_optimizer_step()``), put them back now, warn once, and
        return True (a fault)."""
        if self.held or not self.count:
            return False
        self.restore()
        if not self._warned:
            self._warned = True
            logger.warning("rimguard: step %d ended with %d frozen neurons moved by the optimizer: call after_optimizer_step() "
                           "after every optimizer.step() (they were put back now, but the optimizer's state has moved)",
                           step, self.count)
        return True

    def verify(self) -> bool:
        """True if every frozen slice is bitwise equal to its value at freeze time."""
        return all(torch.equal(read(s.param, s.indexer), s.value) for s in self._slices)

    def remove(self) -> None:
        """Remove the gradient hooks (the frozen values and their snapshots stay)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._grad_index.clear()

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Saved:
        return Saved(dict(self.merged_base), {"frozen": [f.tolist() for f in self.frozen]})

    @torch.no_grad()
    def load_state_dict(self, state: Saved) -> None:
        """Re-apply merged LoRA base weights, then re-freeze the saved neurons at their current values."""
        modules = dict(self.capture.model.named_modules())
        for name, value in state.tensors.items():
            base = getattr(modules[name], "get_base_layer", lambda: modules[name])()
            base.weight.copy_(value.to(base.weight.device, base.weight.dtype))
            self.merged_base[name] = value
        self.freeze([torch.tensor(f, dtype=torch.long) for f in state.meta["frozen"]])
