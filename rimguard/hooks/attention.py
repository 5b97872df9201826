"""Attention rows from the live forward: one query row per head, without eager attention.

SDPA and flash attention never materialise the attention weights, and switching a model to eager
attention changes its kernels (and, for Gemma 2, is the only thing it supports anyway). Instead,
every supported family's attention module hands its *final* queries and keys (after RoPE, after
q/k-norm where the family has it) to an attention function that it looks up, on each forward, with
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, family_eager_function)``.

:class:`AttentionRows` wraps that lookup for the duration of a ``with`` block: the function the
model would have run (SDPA, flash, the family's own eager function, ...) still runs unchanged and
produces the layer's output; beside it, for the attention modules of the one model being probed,
:func:`attention_row` computes the softmax row of the *last* query position (the answer position of a
left-padded prompt batch) for every head, from the same queries and keys, with the call's scaling,
logit soft-capping, sliding window and mask. GQA is handled by mapping query head ``h`` to key head
``h // (H / H_kv)`` (the order of ``repeat_kv``). The model's attention implementation is never
changed, and on exit the lookup is the library's own again, whatever happened in the block.

Supported masks (as the implementation receives them): a 4-D tensor (eager's additive float mask or
SDPA's boolean mask), a 2-D padding mask (flash attention), or None (causal, no padding).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from rimguard.hooks.arch import MLPLayer, UnsupportedModelError
from rimguard.hooks.capture import ProbeComplete


def attention_row(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention weights of the last query position, per head.

    Args:
        query: ``[B, H, T, D]`` queries as the attention function receives them (post-RoPE, post-norm).
        key: ``[B, H_kv, T, D]`` keys, ``H`` a multiple of ``H_kv`` (grouped-query attention).
        mask: the implementation's mask: ``[B|1, 1|H, T, T]`` bool (True = attend) or additive float,
            ``[B, T]`` padding mask (1 = real token), or None (no padding).
        scaling: multiplier of ``q . k``; None: ``D ** -0.5``.
        softcap: logit soft-capping ``c * tanh(s / c)`` (Gemma 2), applied before the mask.
        sliding_window: keys farther back than this many positions are not attended (with a 2-D or no
            mask; a 4-D mask already holds the window).

    Returns:
        ``[B, H, T]`` float32: each head's attention distribution of the last position over the keys
        (rows sum to 1; masked keys are 0).
    """
    b, h, _, d = query.shape
    kv_heads, t = key.shape[1], key.shape[2]
    q = query[:, :, -1].float().reshape(b, kv_heads, h // kv_heads, d)  # query head h reads key head h // group
    scores = torch.einsum("bkgd,bktd->bkgt", q, key.float()).reshape(b, h, t)
    scores = scores * (d**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None and mask.dim() == 4:
        row = mask[:, :, -1, :]  # [B|1, 1|H, T]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    else:
        keep = torch.ones(b, t, dtype=torch.bool, device=key.device) if mask is None else mask.to(torch.bool)
        if sliding_window is not None:
            keep = keep & (torch.arange(t, device=key.device) > t - 1 - sliding_window)
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return scores.softmax(dim=-1)


class AttentionRows:
    """Records, per forward, the last position's attention row of every head of chosen layers.

    Args:
        model: the module the forwards run through (bare or PEFT-wrapped).
        layers: its decoder layers, from :func:`rimguard.hooks.arch.find_mlp_layers` (their blocks say
            which attention module belongs to which layer).
        record: the layer indices to record (default: all).
        stop_early: raise :class:`~rimguard.hooks.capture.ProbeComplete` once the last recorded layer is
            read, so the rest of the forward is not computed (the caller catches it).

    Use::

        rows = AttentionRows(model, layers, record=[3, 7])
        with rows.installed():
            for batch in batches:
                try:
                    model(**batch)
                except ProbeComplete:
                    pass
                r = rows.take()   # [B, 2, H, T]: layers 3 and 7
    """

    def __init__(self, model: nn.Module, layers: Sequence[MLPLayer], record: Sequence[int] | None = None,
                 stop_early: bool = False) -> None:
        self.model = model
        self.record = sorted(set(range(len(layers)) if record is None else record))
        if not self.record or not all(0 <= i < len(layers) for i in self.record):
            raise ValueError(f"record must name decoder layers in [0, {len(layers)}), got {list(record or [])}")
        self._owner: dict[nn.Module, int] = {m: layer.index for layer in layers if layer.index in self.record
                                             for m in layer.block.modules()}
        self._stop_at = self.record[-1] if stop_early else None
        self._rows: dict[int, torch.Tensor] = {}

    @contextmanager
    def installed(self) -> Iterator["AttentionRows"]:
        """Wrap the attention lookup while the block runs; the library's own lookup is back on exit."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        lookup = getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)
        if lookup is None:
            raise UnsupportedModelError("attention rows need transformers' AttentionInterface.get_interface, which the "
                                        "installed transformers lacks (tested with 5.24)")
        if "get_interface" in vars(ALL_ATTENTION_FUNCTIONS):
            raise RuntimeError("AttentionRows.installed() is already active in this process (it does not nest)")

        def get_interface(name: str | None, default: Callable) -> Callable:
            return self._wrap(lookup(name, default))

        ALL_ATTENTION_FUNCTIONS.get_interface = get_interface
        self._rows = {}
        try:
            yield self
        finally:
            del ALL_ATTENTION_FUNCTIONS.get_interface  # the class' method is visible again
            self._rows = {}

    def take(self) -> torch.Tensor:
        """The rows of the last forward, ``[B, L_rec, H, T]`` float32 (layers in ``record`` order); resets."""
        missing = [i for i in self.record if i not in self._rows]
        if missing:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: no attention call was seen for layer(s) {missing}; its attention modules "
                "do not dispatch through transformers' AttentionInterface")
        rows, self._rows = self._rows, {}
        return torch.stack([rows[i] for i in self.record], dim=1)

    def _wrap(self, impl: Callable) -> Callable:
        def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, *args: Any, **kwargs: Any) -> Any:
            layer = self._owner.get(module)
            if layer is not None and query.shape[-2] == key.shape[-2]:  # a full forward (not a cached decode step)
                if kwargs.get("s_aux") is not None or not (attention_mask is None or isinstance(attention_mask, torch.Tensor)):
                    raise UnsupportedModelError(f"{type(module).__name__}: attention rows support tensor or no masks and no "
                                                "learned attention sinks")
                self._rows[layer] = attention_row(query.detach(), key.detach(), attention_mask, kwargs.get("scaling"),
                                                  kwargs.get("softcap"), kwargs.get("sliding_window"))
                if layer == self._stop_at:
                    raise ProbeComplete
            return impl(module, query, key, value, attention_mask, *args, **kwargs)

        return attention
