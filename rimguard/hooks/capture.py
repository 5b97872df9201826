"""The hook layer: every hook rimguard puts on a model is registered here, on one walk of it.

:class:`ActivationCapture` puts one forward pre-hook on every down projection (its input is the
``[B, T, I]`` intermediate activation), a pre-hook on the model itself, which reads the
``attention_mask`` of each call, and a forward hook on the last decoder block. Each layer hook
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

Activation checkpointing re-runs a layer's forward during backward. The model-level pre-hook does
not fire then, so every layer hook sees the same forward id again and skips the statistics; taps
are re-run with ``recompute=True`` so that they can replay their ops (non-reentrant checkpointing
checks that the recomputation saves the same tensors) without double counting.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn

from rimguard.hooks.arch import MLPLayer
from rimguard.hooks.reduce import Reducer, masked_max, masked_max_sum


class ProbeComplete(Exception):
    """Raised by a layer hook inside :meth:`ActivationCapture.probing` once every needed layer has been read."""


class Tap(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, mask: torch.Tensor | None, recompute: bool) -> None: ...


BatchTap = Callable[[nn.Module, tuple, dict], bool]
OutputTap = Callable[[nn.Module, Any], Any]


class ActivationCapture:
    """Hooks a model's MLPs and reduces their activations.

    Args:
        model: the module the training loop calls (bare or PEFT-wrapped).
        layers: from :func:`rimguard.hooks.arch.find_mlp_layers`.
        tracked: per layer, the ``[n_l]`` long tensor of neurons to stream (None = all); default all.
        reducer: the stream reduction, see :func:`rimguard.hooks.reduce.get_reducer`.
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
        self.track(tracked if tracked is not None else [None] * len(self.layers))
        self.reducer = reducer
        self.taps: list[Tap] = []
        self.batch_taps: list[BatchTap] = []
        self.output_taps: list[OutputTap] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_id = 0
        self._seen = [-1] * len(self.layers)
        self._mask: torch.Tensor | None = None
        self._streaming = False
        self._probe_rows: list[list[torch.Tensor]] | None = None
        self._probe_full = False
        self._probe_last: int | None = None
        self._sums: list[torch.Tensor | None] | None = None
        self._count: torch.Tensor | None = None
        self._route: Tap | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "ActivationCapture":
        if self.attached:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_start, with_kwargs=True))
        for pos, layer in enumerate(self.layers):
            self._handles.append(layer.down.module.register_forward_pre_hook(self._layer_hook(pos)))
        self._handles.append(self.layers[-1].block.register_forward_hook(self._on_last_block))
        return self

    def grad_hook(self, param: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.utils.hooks.RemovableHandle:
        """Register ``fn(grad) -> grad`` on ``param``; :meth:`remove` takes it off with the rest."""
        handle = param.register_hook(fn)
        self._handles.append(handle)
        return handle

    def track(self, tracked: Sequence[torch.Tensor | None]) -> None:
        """Set the neurons each layer streams and probes (``[n_l]`` ids, or None for all)."""
        if len(tracked) != len(self.layers):
            raise ValueError(f"tracked has {len(tracked)} entries for {len(self.layers)} layers")
        self.tracked = list(tracked)

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
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if mask is not None and isinstance(ids, torch.Tensor) and mask.shape[1] > ids.shape[1]:
            mask = mask[:, -ids.shape[1] :]  # a forward on a KV cache: the mask spans the cached tokens, then this call's
        self._mask = mask
        self._streaming = training

    def _on_last_block(self, module: nn.Module, args: tuple, output: Any) -> Any:
        for tap in self.output_taps:
            output = tap(module, output)
        return output

    def _layer_hook(self, pos: int) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            recompute = self._seen[pos] == self._forward_id
            self._seen[pos] = self._forward_id
            if self._route is not None:
                self._route(pos, x, self._mask, recompute)
                return
            if self._streaming:
                for tap in self.taps:
                    tap(pos, x, self._mask, recompute)
            if recompute:
                return
            if self._probe_rows is not None:
                index = None if self._probe_full else self.tracked[pos]
                self._probe_rows[pos].append(masked_max(x.detach(), self._mask, index).float())
                if pos == self._probe_last:
                    raise ProbeComplete
            elif self._streaming:
                self._accumulate(pos, x)

        return hook

    def _accumulate(self, pos: int, x: torch.Tensor) -> None:
        sums, count = self.reducer(x, self._mask, self.tracked[pos])
        if self._sums is None:
            self._sums = [None] * len(self.layers)
        held = self._sums[pos]
        self._sums[pos] = sums if held is None else held + sums
        if pos == 0:
            self._count = count if self._count is None else self._count + count

    # -- stream ------------------------------------------------------------------------------
    def drain(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return and reset the stream: ``(sums [N] float32, count [])`` over tracked neurons.

        ``N`` is the total number of tracked neurons, layer-major. None if nothing streamed.
        """
        sums_per_layer, count = self._sums, self._count
        self._sums, self._count = None, None
        if sums_per_layer is None or count is None or any(s is None for s in sums_per_layer):
            return None
        sums = torch.cat(sums_per_layer)  # type: ignore[arg-type]
        return sums, count

    # -- routed forwards ---------------------------------------------------------------------
    @property
    def routing(self) -> bool:
        """True while a :meth:`routed` block runs (its forwards are not training forwards)."""
        return self._route is not None

    @contextmanager
    def routed(self, tap: Tap) -> Iterator[None]:
        """Send every layer's live activation to ``tap`` alone while the block runs.

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
        sequences; ``N`` tracked neurons, or every neuron of every layer if ``full``).

        With ``stop_early``, once the last layer that holds a neuron to collect has been read, the
        hook raises :class:`ProbeComplete`: the rest of the forward (later layers, the final norm,
        the LM head) is not computed; the caller catches it around each forward
        (:func:`rimguard.probing.activations` does).
        """
        if self._probe_rows is not None:
            raise RuntimeError("probing() is not re-entrant")
        self._probe_rows = [[] for _ in self.layers]
        self._probe_full = full
        needed = [pos for pos, ids in enumerate(self.tracked) if full or ids is None or ids.numel()]
        self._probe_last = max(needed, default=len(self.layers) - 1) if stop_early else None
        result: list[torch.Tensor] = []
        try:
            yield result
            count = len(torch.cat(self._probe_rows[0])) if self._probe_rows[0] else 0
            per_layer = [torch.cat(rows) if rows else torch.zeros(count, 0, device=self._device_of(pos))
                         for pos, rows in enumerate(self._probe_rows)]
            result.append(torch.cat(per_layer, dim=1))
        finally:
            self._probe_rows = None

    def _device_of(self, pos: int) -> torch.device:
        return self.layers[pos].down.base.weight.device
