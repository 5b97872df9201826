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

Hook points and their sinks (each sink returns what the hook point needs):

* **batch taps** - ``tap(module, args, kwargs) -> keep``, at the start of a training forward,
  before anything else is recorded for it (the monitor keeps its first batch for KL); a tap that
  returns False is dropped.
* **output taps** - ``tap(block, output) -> output``, on the last decoder block's output of every
  forward: the regularizer ties its loss into the backward pass there.

Three activation sinks, chosen per call:

* **stream** - a training forward (model in train mode, grad enabled): masked-max sums of the
  tracked neurons accumulate on the device, with no host sync.
* **probe** - inside :meth:`ActivationCapture.probing`: per-sequence rows are collected and
  returned when the block ends.
* **taps** - callables run on every training forward with the live (differentiable) activation;
  the entanglement penalty is one.

Every sink sees a source's activation through one interface, ``act.peak(index) -> [B, n]`` (the
per-sequence max over real tokens of the source's units ``index``; MoE units with no routed token
are ``MISSING``), so none of them knows whether a layer is dense or mixture-of-experts. Sources
are numbered in model order; within a layer they hold increasing unit ids, so their outputs,
concatenated, are layer-major like the atlas.

Activation checkpointing re-runs a layer's forward during backward. The model-level pre-hook does
not fire then, so every layer hook sees the same forward id again and skips the statistics; taps
are re-run with ``recompute=True`` so that they can replay their ops (non-reentrant checkpointing
checks that the recomputation saves the same tensors) without double counting.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from rimguard.hooks.arch import ExpertBank, MLPLayer
from rimguard.hooks.reduce import Reducer, masked_max, masked_max_sum, present_sum, routed_max

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
    def __call__(self, source: int, act: Activation, recompute: bool) -> None: ...


BatchTap = Callable[[nn.Module, tuple, dict], bool]
OutputTap = Callable[[nn.Module, Any], Any]


class ActivationCapture:
    """Hooks a model's MLPs and reduces their activations.

    Args:
        model: the module the training loop calls (bare or PEFT-wrapped).
        layers: from :func:`rimguard.hooks.arch.find_mlp_layers`.
        tracked: per layer, the ``[n_l]`` long tensor of neurons (layer ids, increasing) to stream (None = all); default all.
        reducer: the dense stream reduction, see :func:`rimguard.hooks.reduce.get_reducer`.

    Taps, probe rows and the stream are indexed by source (:attr:`sources`), not by layer.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[MLPLayer],
        tracked: Sequence[torch.Tensor | None] | None = None,
        reducer: Reducer = masked_max_sum,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.sources = sources_of(self.layers)
        self.track(tracked if tracked is not None else [None] * len(self.layers))
        self.reducer = reducer
        self.taps: list[Tap] = []
        self.batch_taps: list[BatchTap] = []
        self.output_taps: list[OutputTap] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_id = 0
        self._seen = [-1] * len(self.sources)
        self._mask: torch.Tensor | None = None
        self._batch = 1
        self._streaming = False
        self._probe_rows: list[list[torch.Tensor]] | None = None
        self._probe_full = False
        self._probe_last: set[int] = set()
        self._probe_read: set[int] = set()
        self._sums: list[torch.Tensor | None] | None = None
        self._counts: list[torch.Tensor | None] | None = None
        self._route: Tap | None = None
        self._watched: list[torch.Tensor | None] = [None] * len(self.sources)
        self._router: dict[str, torch.Tensor] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "ActivationCapture":
        if self.attached:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        for pos, src in enumerate(self.sources):
            self._handles.append(src.module.register_forward_pre_hook(self._source_hook(pos), with_kwargs=True))
        self._handles.append(self.layers[-1].block.register_forward_hook(self._on_last_block))
        return self

    def grad_hook(self, param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(grad) -> grad`` on ``param``; :meth:`remove` takes it off with the rest."""
        handle = param.register_hook(fn)
        self._handles.append(handle)
        return handle

    def track(self, tracked: Sequence[torch.Tensor | None]) -> None:
        """Set the neurons each layer streams and probes (``[n_l]`` increasing layer ids, or None for all)."""
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
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None

    # -- hooks -------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        training = self._probe_rows is None and self._route is None and module.training and torch.is_grad_enabled()
        if training and self.batch_taps:  # first: a tap may run its own forwards, which must not clobber this one's state
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
        self._streaming = training

    def _on_last_block(self, module: nn.Module, args: tuple, output: Any) -> Any:
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
        src = self.sources[pos]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            act = self._activation(src, args, kwargs)
            recompute = self._seen[pos] == self._forward_id
            self._seen[pos] = self._forward_id
            if self._route is not None:
                self._route(pos, act, recompute)
                return
            if self._streaming:
                for tap in self.taps:
                    tap(pos, act, recompute)
            if recompute:
                return
            if self._watched[pos] is not None and (self._probe_rows is not None or self._streaming):
                self._count_routes(pos, act, "probe" if self._probe_rows is not None else "train")
            if self._probe_rows is not None:
                index = None if self._probe_full else self.source_tracked[pos]
                with torch.no_grad():
                    self._probe_rows[pos].append(act.peak(index).float())
                self._probe_read.add(pos)
                if self._probe_last and self._probe_last <= self._probe_read:
                    raise ProbeComplete
            elif self._streaming:
                self._accumulate(pos, act)

        return hook

    def _accumulate(self, pos: int, act: Activation) -> None:
        index = self.source_tracked[pos]
        with torch.no_grad():
            if isinstance(act, DenseActivation):
                sums, count = self.reducer(act.x, act.mask, index)
                count = count.expand_as(sums)
            else:
                sums, count = present_sum(act.peak(index))
        if self._sums is None or self._counts is None:
            self._sums, self._counts = [None] * len(self.sources), [None] * len(self.sources)
        held, held_count = self._sums[pos], self._counts[pos]
        self._sums[pos] = sums if held is None else held + sums
        self._counts[pos] = count if held_count is None else held_count + count

    # -- router ------------------------------------------------------------------------------
    def watch_experts(self, per_layer: Sequence[torch.Tensor]) -> None:
        """Count the routing slots that go to the experts holding ``per_layer`` neurons (layer ids), on
        probe and training forwards; read with :meth:`drain_router`."""
        for pos, (src, (ids, _)) in enumerate(zip(self.sources, self.split(per_layer))):
            if src.bank is not None and ids.numel():
                watched = torch.zeros(src.bank.num_experts, dtype=torch.bool, device=ids.device)
                self._watched[pos] = watched.index_fill_(0, ids // src.bank.size, True)

    def _count_routes(self, pos: int, act: Activation, kind: str) -> None:
        assert isinstance(act, ExpertActivation)
        watched = self._watched[pos]
        assert watched is not None
        with torch.no_grad():
            hits = watched.to(act.routes.device)[act.routes].float()  # [N, k]: slot goes to a watched expert
            real = act.mask.reshape(-1, 1).float() if act.mask is not None else torch.ones_like(hits[:, :1])
            counts = torch.stack([(hits * real).sum(), real.sum() * hits.shape[1]])
        self._router[kind] = counts if kind not in self._router else self._router[kind] + counts

    def drain_router(self, kind: str) -> torch.Tensor | None:
        """``[2]`` float32 (slots routed to watched experts, all slots) over real tokens since the last call,
        on ``"probe"`` or ``"train"`` (training) forwards; None if none were counted."""
        return self._router.pop(kind, None)

    # -- stream ------------------------------------------------------------------------------
    def drain(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return and reset the stream: ``(sums [N], count [N])`` float32 over tracked neurons, layer-major:
        per neuron, the sum of its per-sequence maxima and how many sequences had a value. None if nothing streamed."""
        sums, counts = self._sums, self._counts
        self._sums, self._counts = None, None
        if sums is None or counts is None or any(s is None for s in sums) or any(c is None for c in counts):
            return None
        return torch.cat(sums), torch.cat(counts)  # type: ignore[arg-type]

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
        (:func:`rimguard.probing.activations` does).
        """
        if self._probe_rows is not None:
            raise RuntimeError("probing() is not re-entrant")
        self._probe_rows = [[] for _ in self.sources]
        self._probe_full = full
        needed = [pos for pos, ids in enumerate(self.source_tracked) if full or ids is None or ids.numel()]
        last = self.sources[needed[-1]].layer if needed and stop_early else None
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
