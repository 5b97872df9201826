"""The hook layer: every hook rimguard puts on a model is registered here, on one walk of it.

:class:`ActivationCapture` puts one forward pre-hook on every *source* of neurons - a dense down
projection (its input is the ``[B, T, I]`` intermediate activation) or a MoE layer's experts module
(its inputs are the tokens and their routing, from which the tracked units are computed, see
:class:`ExpertActivation`) - a pre-hook on the model itself, which reads the ``attention_mask``
and shape of each call, and a forward hook on the last decoder block. A MoE layer with a shared
expert has two sources: its experts (layer ids ``[0, E * I)``) and the shared expert after them. Each layer hook
reduces the activation at once, so no activation tensor outlives its forward pass. Gradient hooks
on parameters (the freeze) are registered through :meth:`ActivationCapture.grad_hook`, so that
:meth:`ActivationCapture.remove` takes every hook off.

The capture only dispatches; what is computed from an activation belongs to its taps, all with
one signature, ``tap(source, act, recompute)`` (:class:`Tap`), registered for a kind of forward:

* ``"train"`` taps - every training forward (model in train mode, grad enabled): the monitor's
  reasoning stream and router count (:mod:`rimguard.signals.stream`), the activation penalty;
* ``"probe"`` taps - every forward inside :meth:`ActivationCapture.probing`, which also collects
  per-sequence rows of the tracked neurons and returns them when the block ends;
* a routed tap - inside :meth:`ActivationCapture.routed`, the given tap alone (the safety anchor's
  forward with gradient, which is neither training data nor a probe).

Two more hook points on training forwards: **batch taps**, ``tap(module, args, kwargs) -> keep``,
at the start of the forward (the monitor keeps its first batch for KL; a tap that returns False is
dropped; a batch tap must not run forwards), and **output taps**, ``tap(block, output) -> output``,
on the last decoder block's output (the regularizers' loss tie, :mod:`rimguard.actions.tie`).

Every sink sees a source's activation through one interface, ``act.peak(index) -> [B, n]`` (the
per-sequence max over real tokens of the source's units ``index``; MoE units with no routed token
are ``MISSING``), so none of them knows whether a layer is dense or mixture-of-experts. Sources
are numbered in model order; within a layer they hold increasing unit ids, so their outputs,
concatenated, are layer-major like the atlas.

Activation checkpointing re-runs a layer's forward during backward. The model-level pre-hook does
not fire then, so every layer hook sees the same forward id again; taps
are re-run with ``recompute=True`` so that they can replay their ops (non-reentrant checkpointing
checks that the recomputation saves the same tensors) without double counting.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.hooks.arch import ExpertBank, MLPLayer
from rimguard.hooks.reduce import masked_max, routed_max

logger = logging.getLogger("rimguard")

# units per chunk when a probe reads every unit of a MoE layer ([tokens, chunk] pre-activations at a time)
EXPERT_CHUNK = 4096


class ProbeComplete(Exception):
    """Raised by a layer hook inside :meth:`ActivationCapture.probing` once every needed layer has been read."""


class Activation(Protocol):
    """One source's activation in one forward."""

    def peak(self, index: torch.Tensor | None) -> torch.Tensor:
        """``[B, n]``: per sequence, the max over its real tokens of units ``index`` (None: all), differentiable."""
        ...


@dataclass
class DenseActivation:
    """A dense MLP's intermediate activation ``x`` ``[B, T, I]`` and the real tokens ``mask`` ``[B, T]``."""

    x: torch.Tensor
    mask: torch.Tensor | None

    def peak(self, index: torch.Tensor | None) -> torch.Tensor:
        return masked_max(self.x, self.mask, index)


@dataclass
class ExpertActivation:
    """A MoE layer's experts in one forward: their input ``hidden`` ``[N, H]`` (``N = B * T``) and
    ``routes`` ``[N, k]``. A unit's activation is computed from its own gate and up rows, on the
    tokens alone (``[N, n]``), never for all experts."""

    bank: ExpertBank
    hidden: torch.Tensor
    routes: torch.Tensor
    mask: torch.Tensor | None
    batch: int

    def peak(self, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:  # every unit (atlas identification): in chunks, to bound the [N, chunk] pre-activations
            units = torch.arange(self.bank.units, device=self.hidden.device)
            return torch.cat([self._peak(units[lo : lo + EXPERT_CHUNK]) for lo in range(0, self.bank.units, EXPERT_CHUNK)], 1)
        return self._peak(index)

    def _peak(self, units: torch.Tensor) -> torch.Tensor:
        gate_w, up_w, gate_b, up_b = self.bank.gate_up_rows(units)
        pre_gate, pre_up = self.hidden @ gate_w.T, self.hidden @ up_w.T
        if gate_b is not None and up_b is not None:
            pre_gate, pre_up = pre_gate + gate_b, pre_up + up_b
        return routed_max(self.hidden, self.routes, units // self.bank.size, pre_gate, pre_up, self.bank.activation,
                          self.mask, self.batch)


@dataclass(frozen=True)
class Source:
    """Where one set of a layer's neurons is read.

    Attributes:
        layer: position of its layer in ``capture.layers``.
        offset: the layer id of its unit 0.
        size: its number of units.
        module: the hooked module (a down projection, or an experts module).
        bank: the routed experts, or None for a dense down projection.
    """

    layer: int
    offset: int
    size: int
    module: nn.Module
    bank: ExpertBank | None = None


def sources_of(layers: Sequence[MLPLayer]) -> list[Source]:
    """Every layer's sources in model order: its routed experts, then its dense down projection."""
    out = []
    for pos, layer in enumerate(layers):
        if layer.experts is not None:
            out.append(Source(pos, 0, layer.experts.units, layer.experts.module, layer.experts))
        if layer.down is not None:
            out.append(Source(pos, layer.dense_offset, layer.size - layer.dense_offset, layer.down.module))
    return out


def split_per_source(sources: Sequence[Source], per_layer: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per source, ``(local ids [m], positions [m])``: the layer ids of ``per_layer[layer]`` that the source
    holds, less its offset, and where they stand in that layer's list (to split values held alongside)."""
    out = []
    for src in sources:
        ids = per_layer[src.layer]
        pos = ((ids >= src.offset) & (ids < src.offset + src.size)).nonzero().squeeze(1)
        out.append((ids[pos] - src.offset, pos))
    return out


class Tap(Protocol):
    """The one hook signature: source ``source``'s activation ``act`` in one forward; ``recompute`` is True
    when an activation-checkpointed layer is re-run during backward (replay ops, do not count again)."""

    def __call__(self, source: int, act: Activation, recompute: bool) -> None: ...


BatchTap = Callable[[nn.Module, tuple, dict], bool]
OutputTap = Callable[[nn.Module, Any], Any]
ForwardKind = Literal["train", "probe"]


class ActivationCapture:
    """Hooks a model's MLPs and dispatches their activations to taps. It computes nothing itself.

    Args:
        model: the module the training loop calls (bare or PEFT-wrapped).
        layers: from :func:`rimguard.hooks.arch.find_mlp_layers`.
        tracked: per layer, the ``[n_l]`` long tensor of neurons (layer ids, increasing) that a probe pass
            collects (None = all); default all. The guard's owner sets it once the atlas is known (:meth:`track`).

    Taps, probe rows and every index are per source (:attr:`sources`), not per layer. A forward is one of:

    * a **training forward** (the model in train mode, grad enabled, outside the blocks below): the
      ``"train"`` taps run (the reasoning stream, the activation penalty, the router count), then the
      batch taps before it and the output taps after the last block;
    * a **probe forward**, inside :meth:`probing`: rows are collected and the ``"probe"`` taps run;
    * a **routed forward**, inside :meth:`routed`: the one given tap alone runs (the anchor's batch).
    """

    def __init__(self, model: nn.Module, layers: Sequence[MLPLayer], tracked: Sequence[torch.Tensor | None] | None = None) -> None:
        self.model = model
        self.layers = list(layers)
        self.sources = sources_of(self.layers)
        self.track(tracked if tracked is not None else [None] * len(self.layers))
        self.taps: dict[str, list[Tap]] = {"train": [], "probe": []}
        self.batch_taps: list[BatchTap] = []
        self.output_taps: list[OutputTap] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_id = 0
        self._seen = [-1] * len(self.sources)
        self._mask: torch.Tensor | None = None
        self._batch = 1
        self._training = False
        self._probe_rows: list[list[torch.Tensor]] | None = None
        self._probe_full = False
        self._probe_last: set[int] = set()
        self._probe_read: set[int] = set()
        self._route: Tap | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, exclusive: bool = False) -> "ActivationCapture":
        """Register the hooks. ``exclusive``: this is the model's guard capture (:func:`claim`): a stale one left
        by an interrupted run is removed first."""
        if self.attached:
            return self
        if exclusive:
            claim(self.model, self)
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        for pos, src in enumerate(self.sources):
            self._handles.append(src.module.register_forward_pre_hook(self._source_hook(pos), with_kwargs=True))
        self._handles.append(self.layers[-1].block.register_forward_hook(self._on_last_block))
        return self

    def add_tap(self, tap: Tap, on: ForwardKind | Sequence[ForwardKind] = "train") -> None:
        """Run ``tap`` on every source of every forward of the given kind(s)."""
        for kind in (on,) if isinstance(on, str) else on:
            self.taps[kind].append(tap)

    def grad_hook(self, param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(grad) -> grad`` on ``param``; :meth:`remove` takes it off with the rest."""
        handle = param.register_hook(fn)
        self._handles.append(handle)
        return handle

    def track(self, tracked: Sequence[torch.Tensor | None]) -> None:
        """Set the neurons a probe pass collects per layer (``[n_l]`` increasing layer ids, or None for all)."""
        if len(tracked) != len(self.layers):
            raise ValueError(f"tracked has {len(tracked)} entries for {len(self.layers)} layers")
        self.tracked = list(tracked)
        full = [torch.arange(layer.size) for layer in self.layers]
        ids = [full[i] if t is None else t for i, t in enumerate(self.tracked)]
        self.source_tracked: list[torch.Tensor | None] = [
            None if self.tracked[src.layer] is None else local for src, (local, _) in zip(self.sources, split_per_source(self.sources, ids))
        ]

    def split(self, per_layer: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`split_per_source` over this capture's sources."""
        return split_per_source(self.sources, per_layer)

    def routed_units(self) -> torch.Tensor:
        """``[N]`` bool over the tracked neurons (layer-major): True for MoE expert units, which can be ``MISSING``."""
        parts = [torch.full((src.size if ids is None else ids.numel(),), src.bank is not None)
                 for src, ids in zip(self.sources, self.source_tracked)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)

    def remove(self) -> None:
        """Take every hook off the model (forward hooks and gradient hooks) and drop every tap."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        release(self.model, self)
        self.taps = {"train": [], "probe": []}
        self.batch_taps, self.output_taps = [], []
        self._mask = None

    # -- hooks -------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        training = self._probe_rows is None and self._route is None and module.training and torch.is_grad_enabled()
        if training and self.batch_taps:
            self.batch_taps = [tap for tap in self.batch_taps if tap(module, args, kwargs)]
        # the mask is kept after the forward: a checkpointed layer recomputed during backward
        # belongs to the latest forward and must replay with its mask (same ops, same saved tensors)
        self._forward_id += 1
        self._probe_read = set()
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if mask is not None and isinstance(ids, torch.Tensor) and mask.shape[1] > ids.shape[1]:
            mask = mask[:, -ids.shape[1] :]  # a forward on a KV cache: the mask spans the cached tokens, then this call's
        self._mask = mask
        self._batch = ids.shape[0] if isinstance(ids, torch.Tensor) else (mask.shape[0] if mask is not None else 1)
        self._training = training

    def _on_last_block(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._training or not module.training or not torch.is_grad_enabled():
            return output
        for tap in self.output_taps:
            output = tap(module, output)
        return output

    def _activation(self, src: Source, args: tuple, kwargs: dict) -> Activation:
        if src.bank is None:
            x = args[0] if args else kwargs["input"]
            if x.dim() == 2:  # a shared expert called on flattened tokens [B * T, I]
                x = x.view(self._batch, -1, x.shape[-1])
            return DenseActivation(x, self._mask)
        hidden = args[0] if args else kwargs["hidden_states"]
        routes = args[1] if len(args) > 1 else kwargs["top_k_index"]
        return ExpertActivation(src.bank, hidden, routes, self._mask, self._batch)

    def _source_hook(self, pos: int) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            act = self._activation(self.sources[pos], args, kwargs)
            recompute = self._seen[pos] == self._forward_id
            self._seen[pos] = self._forward_id
            if self._route is not None:
                self._route(pos, act, recompute)
                return
            probing = self._probe_rows is not None
            if not probing and not self._training:
                return
            for tap in self.taps["probe" if probing else "train"]:
                tap(pos, act, recompute)
            if probing and not recompute:
                self._collect(pos, act)

        return hook

    def _collect(self, pos: int, act: Activation) -> None:
        assert self._probe_rows is not None
        index = None if self._probe_full else self.source_tracked[pos]
        with torch.no_grad():
            self._probe_rows[pos].append(act.peak(index).float())
        self._probe_read.add(pos)
        if self._probe_last and self._probe_last <= self._probe_read:
            raise ProbeComplete

    # -- routed forwards ---------------------------------------------------------------------
    @property
    def routing(self) -> bool:
        """True while a :meth:`routed` block runs (its forwards are not training forwards)."""
        return self._route is not None

    @contextmanager
    def routed(self, tap: Tap) -> Iterator[None]:
        """Send every source's live activation to ``tap`` alone while the block runs.

        For the guard's own forwards with gradient (the safety anchor's batch): they are neither
        streamed as training data nor seen by the other taps.
        """
        if self._route is not None or self._probe_rows is not None:
            raise RuntimeError("routed() cannot nest with routed() or probing()")
        self._route = tap
        try:
            yield
        finally:
            self._route = None

    # -- probe -------------------------------------------------------------------------------
    @contextmanager
    def probing(self, full: bool = False, stop_early: bool = False) -> Iterator[list[torch.Tensor]]:
        """Collect per-sequence maxima while the block runs forwards.

        Yields a list that, when the block exits, holds one ``[P, N]`` float32 tensor (``P``
        sequences; ``N`` tracked neurons, or every neuron of every layer if ``full``; MoE units
        without a routed token are ``MISSING``).

        With ``stop_early``, once every source of the last layer that holds a neuron to collect has
        been read, the hook raises :class:`ProbeComplete`: the rest of the forward (later layers,
        the final norm, the LM head) is not computed; the caller catches it around each forward
        (:func:`rimguard.passes.activations` does). Not under DeepSpeed ZeRO-3 (:func:`rimguard.dist.interruptible`).
        """
        if self._probe_rows is not None:
            raise RuntimeError("probing() is not re-entrant")
        self._probe_rows = [[] for _ in self.sources]
        self._probe_full = full
        needed = [pos for pos, ids in enumerate(self.source_tracked) if full or ids is None or ids.numel()]
        last = self.sources[needed[-1]].layer if needed and stop_early and dist.interruptible(self.model) else None
        self._probe_last = {pos for pos, src in enumerate(self.sources) if src.layer == last}
        result: list[torch.Tensor] = []
        try:
            yield result
            count = next((len(torch.cat(rows)) for rows in self._probe_rows if rows), 0)
            per_source = [torch.cat(rows) if rows else torch.zeros(count, 0, device=self._device_of(pos))
                          for pos, rows in enumerate(self._probe_rows)]
            result.append(torch.cat(per_source, dim=1))
        finally:
            self._probe_rows = None
            self._probe_last = set()

    def _device_of(self, pos: int) -> torch.device:
        return self.layers[self.sources[pos].layer].weight().device


_OWNERS: "weakref.WeakKeyDictionary[nn.Module, ActivationCapture]" = weakref.WeakKeyDictionary()  # model -> its guard capture


def claim(model: nn.Module, owner: "ActivationCapture") -> None:
    """Make ``owner`` the model's one guard capture. An earlier one still attached (its ``train()`` was interrupted,
    so its end never ran) is removed first: its penalty, freeze and taps must not follow the model into a new run."""
    stale = _OWNERS.get(model)
    if stale is not None and stale is not owner and stale.attached:
        logger.warning("rimguard: removing the hooks of an earlier guard on this model whose run did not end (an interrupted "
                       "train()?); call guard.detach() after an interrupted run to do it yourself")
        stale.remove()
    _OWNERS[model] = owner


def release(model: nn.Module, owner: "ActivationCapture") -> None:
    if _OWNERS.get(model) is owner:
        del _OWNERS[model]

