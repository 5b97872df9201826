"""The hot-path reduction: per-neuron masked max over tokens.

Shapes: ``x`` is one layer's intermediate activation ``[B, T, I]``; ``mask`` is ``[B, T]``
(True/1 = real token) or None; ``index`` is a ``[n]`` long tensor of tracked neurons or None
for all ``I``. Results are float32 and stay on ``x``'s device: nothing here syncs with the host.

A sequence with no real token has no maximum; its row is 0 and it is not counted.
"""

from __future__ import annotations

from typing import Callable

import torch

Reducer = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor]"]


def masked_max(x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence, per-neuron maximum over real tokens.

    Returns:
        ``[B, n]`` in ``x``'s dtype (differentiable; rows of empty sequences are 0).
    """
    # Reduce over tokens first, then pick the tracked neurons: a gather along the last dim of
    # [B, T, I] costs far more than the max itself (measured 70 ms vs 2.4 ms on CPU, 8x512x1536).
    if mask is None:
        peak = x.amax(dim=1)
        return peak if index is None else peak.index_select(-1, index)
    keep = mask.to(torch.bool)
    bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill_(~keep, torch.finfo(x.dtype).min)
    peak = (x + bias.unsqueeze(-1)).amax(dim=1)  # padding sinks to the dtype's lowest value (or -inf)
    if index is not None:
        peak = peak.index_select(-1, index)
    return torch.where(keep.any(dim=1, keepdim=True), peak, torch.zeros_like(peak))


def masked_max_sum(
    x: torch.Tensor, mask: torch.Tensor | None, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over sequences of :func:`masked_max`, and the number of sequences counted.

    Returns:
        ``(sums [n] float32, count [] float32)``, both on ``x``'s device.
    """
    peak = masked_max(x.detach(), mask, index).float()
    if mask is None:
        count = torch.full((), float(x.shape[0]), device=x.device)
    else:
        count = mask.to(torch.bool).any(dim=1).sum().float()
    return peak.sum(dim=0), count


_COMPILED: dict[str, Reducer] = {}


def get_reducer(device: torch.device, fused: bool | None = None) -> Reducer:
    """The reduction to use on ``device``.

    On CUDA the default is a ``torch.compile``-fused :func:`masked_max_sum` (one kernel reads
    the activation once); elsewhere, or with ``fused=False``, the plain torch version.
    """
    if fused is None:
        fused = device.type == "cuda"
    if not fused:
        return masked_max_sum
    if "fused" not in _COMPILED:
        _COMPILED["fused"] = torch.compile(masked_max_sum, dynamic=True, fullgraph=True)
    return _COMPILED["fused"]
