"""Behavioural witnesses: what the model does on the monitor's own harmful probes, against train start.

The neuron signals (``safety_drop``, RAS) say how far the safety neurons moved; a witness says
whether the behaviour moved. Both are read in the check's prompt pass
(:func:`rimguard.passes.prompt_pass`), on the monitor's check probes, which no action trains on:

* ``refusal_kl`` - teacher-forced KL(pi_0 || pi_t) on the base model's own greedy responses to the
  probes (the atlas' probe responses), per response token, averaged over each probe's tokens and
  then over probes (nats). The base distribution is recorded at train start as its top-k log-probs
  plus a tail bucket (:func:`rimguard.signals.metrics.topk_kl`). It costs the response forward's
  remaining layers and LM head, no generation.
* ``probe_refusal`` - the share of probes whose greedy opening (``witness_tokens`` tokens, decoded
  on the prompt's KV cache) the judge calls a refusal, logged with its Wilson 95% interval
  (``probe_refusal_lo``, ``probe_refusal_hi``) and count (``probe_refusal_n``), and
  ``probe_refusal_drop``: the base share minus the share now (higher is riskier, so it can carry a
  threshold). The judge is a callable ``judge(text) -> bool`` (True: a refusal); by default the
  string judge of :mod:`rimguard.signals.judge`.

The base record is taken on every rank over all probes (so each rank holds every probe's reference);
a check measures each rank's share and the sums are all-reduced.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from rimguard import dist
from rimguard.saved import Saved
from rimguard.signals import metrics
from rimguard.signals.judge import judge as string_judge

RefusalJudge = Callable[[str], bool]


def default_judge(text: str) -> bool:
    """The string judge: a refusal marker near the start, and not a degenerate loop."""
    return string_judge(text) == "refusal"


class Witness:
    """Accumulates the two witnesses over one pass (see module docstring).

    Args:
        tokenizer: decodes the openings for the judge.
        probes: the number ``P`` of check probes (rows of the base record).
        width: the longest response, tokens (``R`` of the base record).
        top_k: base log-probs kept per response token.
        kl: measure ``refusal_kl``.
        tokens: greedy opening length for ``probe_refusal`` (0: not measured).
        judge: ``judge(text) -> bool``.
    """

    def __init__(self, tokenizer, probes: int, width: int, top_k: int, kl: bool, tokens: int,
                 judge: RefusalJudge | None = None) -> None:
        self.tokenizer, self.probes, self.width, self.top_k = tokenizer, probes, width, top_k
        self.kl, self.tokens, self.judge = kl, tokens, judge or default_judge
        self.base_logp: torch.Tensor | None = None  # [P, R, k]
        self.base_index: torch.Tensor | None = None  # [P, R, k]
        self.base_refusal: float | None = None
        self._recording = False
        self._sums: torch.Tensor | None = None  # [4]: kl sum, kl count, refusals, judged
        self._device: torch.device | None = None

    @property
    def active(self) -> bool:
        return self.kl or self.tokens > 0

    # -- one pass ------------------------------------------------------------------------------
    def begin(self, device: torch.device, record: bool) -> None:
        """Start a pass: ``record`` takes the base references (every probe), else a check measures against them."""
        self._recording, self._device = record, device
        self._sums = torch.zeros(4, device=device)
        if record and self.kl:
            self.base_logp = torch.zeros(self.probes, self.width, self.top_k, device=device)
            self.base_index = torch.zeros(self.probes, self.width, self.top_k, dtype=torch.long, device=device)

    def reader(self, ids: Sequence[int]) -> Callable[[list[int], torch.Tensor, torch.Tensor], None] | None:
        """A ``read_responses`` callback for a prompt pass over probes ``ids`` (its rows, in order)."""
        if not self.kl:
            return None

        def read(rows: list[int], logp: torch.Tensor, mask: torch.Tensor) -> None:
            at = torch.tensor([ids[r] for r in rows], device=logp.device)
            width = logp.shape[1]
            if self._recording:
                assert self.base_logp is not None and self.base_index is not None
                top = logp.topk(self.top_k, dim=-1)
                self.base_logp[at, :width], self.base_index[at, :width] = top.values, top.indices
                return
            assert self.base_logp is not None and self.base_index is not None and self._sums is not None
            base_logp, base_index = self.base_logp[at, :width], self.base_index[at, :width]
            per_row = torch.stack([metrics.topk_kl(base_logp[i : i + 1], base_index[i : i + 1], logp[i : i + 1], mask[i : i + 1])
                                   for i in range(len(rows))])
            self._sums[0] += per_row.sum()
            self._sums[1] += len(rows)

        return read

    def judge_openings(self, openings: Sequence[Sequence[int]]) -> None:
        """Judge a pass's greedy openings (token ids)."""
        assert self._sums is not None
        texts = self.tokenizer.batch_decode([list(o) for o in openings], skip_special_tokens=True)
        refused = sum(bool(self.judge(t)) for t in texts)
        self._sums[2] += refused
        self._sums[3] += len(texts)

    def finish(self) -> dict[str, float]:
        """End the pass: the base share of refusals (when recording), or every witness value (a collective)."""
        assert self._sums is not None
        sums, self._sums = dist.sum_shards(self._sums), None
        if self._recording:  # each rank recorded its share of the probes (zeros elsewhere): the sum is every probe
            if self.base_logp is not None and self.base_index is not None:
                self.base_logp, self.base_index = dist.sum_shards(self.base_logp), dist.sum_shards(self.base_index)
            self.base_refusal = float(sums[2] / sums[3]) if self.tokens and float(sums[3]) > 0 else None
            return {}
        kl_sum, kl_count, refused, judged = sums.tolist()
        out: dict[str, float] = {}
        if self.kl and kl_count:
            out["refusal_kl"] = kl_sum / kl_count
        if self.tokens and judged:
            share = refused / judged
            lo, hi = metrics.wilson(refused, judged)
            out.update({"probe_refusal": share, "probe_refusal_lo": lo, "probe_refusal_hi": hi, "probe_refusal_n": judged})
            if self.base_refusal is not None:
                out["probe_refusal_drop"] = self.base_refusal - share
        return out

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> Saved:
        tensors = {} if self.base_logp is None or self.base_index is None else {
            "base_logp": self.base_logp.detach().cpu(), "base_index": self.base_index.detach().cpu()}
        return Saved(tensors, {"base_refusal": self.base_refusal})

    def load_state_dict(self, state: Saved, device: torch.device) -> None:
        if self.kl:
            self.base_logp = state.tensors["base_logp"].to(device)
            self.base_index = state.tensors["base_index"].to(device)
        self.base_refusal = state.meta.get("base_refusal")
