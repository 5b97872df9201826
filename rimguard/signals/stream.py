"""What the monitor reads from the training forwards themselves: two capture taps, no extra forward.

* :class:`TaskStream` - per tracked neuron, the sum over training sequences of its max over real
  tokens, and how many sequences had a value (a MoE unit counts only the sequences that routed a
  token to its expert), accumulated on the device with no host sync and drained once per
  optimizer step.
* :class:`RouterCount` - for mixture-of-experts models, the routing slots (real tokens x top-k)
  sent to the experts that hold safety neurons, and all slots, on one kind of forward.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rimguard.hooks.capture import Activation, DenseActivation, ExpertActivation, Source
from rimguard.hooks.reduce import Reducer, present_sum


class TaskStream:
    """A ``"train"`` tap: streamed masked-max sums of the tracked neurons.

    Args:
        index: per capture source, its ``[n_s]`` tracked unit ids (local to the source), or None for all.
        reducer: the dense reduction (:func:`rimguard.hooks.reduce.get_reducer`).
    """

    def __init__(self, index: Sequence[torch.Tensor | None], reducer: Reducer) -> None:
        self.index, self.reducer = list(index), reducer
        self._sums: list[torch.Tensor | None] = [None] * len(self.index)
        self._counts: list[torch.Tensor | None] = [None] * len(self.index)

    def __call__(self, source: int, act: Activation, recompute: bool) -> None:
        if recompute:
            return
        index = self.index[source]
        with torch.no_grad():
            if isinstance(act, DenseActivation):
                sums, count = self.reducer(act.x, act.mask, index)
                count = count.expand_as(sums)
            else:
                sums, count = present_sum(act.peak(index))
        held, held_count = self._sums[source], self._counts[source]
        self._sums[source] = sums if held is None else held + sums
        self._counts[source] = count if held_count is None else held_count + count

    def drain(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return and reset: ``(sums [N], count [N])`` float32 over the tracked neurons, layer-major. None
        unless every source streamed since the last drain."""
        sums, counts = self._sums, self._counts
        self._sums, self._counts = [None] * len(self.index), [None] * len(self.index)
        if any(s is None for s in sums) or any(c is None for c in counts):
            return None
        return torch.cat(sums), torch.cat(counts)  # type: ignore[arg-type]


class RouterCount:
    """A tap counting the routing slots sent to watched experts; see :meth:`drain`.

    Args:
        sources: the capture's sources.
        per_source: per source, its ``[m]`` watched unit ids (local); their experts are watched.
    """

    def __init__(self, sources: Sequence[Source], per_source: Sequence[torch.Tensor]) -> None:
        self.watched: list[torch.Tensor | None] = []
        for src, ids in zip(sources, per_source):
            watched = None
            if src.bank is not None and ids.numel():
                watched = torch.zeros(src.bank.num_experts, dtype=torch.bool, device=ids.device).index_fill_(0, ids // src.bank.size, True)
            self.watched.append(watched)
        self._counts: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return any(w is not None for w in self.watched)

    def __call__(self, source: int, act: Activation, recompute: bool) -> None:
        watched = self.watched[source]
        if recompute or watched is None:
            return
        assert isinstance(act, ExpertActivation)
        with torch.no_grad():
            hits = watched.to(act.routes.device)[act.routes].float()  # [N, k]: slot goes to a watched expert
            real = act.mask.reshape(-1, 1).float() if act.mask is not None else torch.ones_like(hits[:, :1])
            counts = torch.stack([(hits * real).sum(), real.sum() * hits.shape[1]])
        self._counts = counts if self._counts is None else self._counts + counts

    def drain(self) -> torch.Tensor | None:
        """``[2]`` float32 (slots routed to watched experts, all slots) over real tokens since the last call;
        None if none were counted."""
        counts, self._counts = self._counts, None
        return counts
