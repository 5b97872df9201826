"""Actions that hold the model to its own base behaviour: the safety anchor and parameter anchoring.

**Safety anchor** (the default ``regularize`` action). At train start the guard records the base
model's own greedy responses to a set of *anchor prompts* (harmful requests, plus harmless
look-alikes so that the anchor does not teach blanket refusal), the base model's top-k
log-probabilities on those response tokens, and the safety neurons' activations on the harmful
ones. No second model is kept: the record is a few hundred kB and is saved with the guard's
checkpoint state. Every ``anchor_every`` optimizer steps a small anchor batch runs forward with
gradient, and

    A = KL(pi_0 || pi_t) on the response tokens  +  mu * shrink(safety neurons on the harmful rows)

is added to the step's loss with weight lambda (``shrink`` is :func:`rimguard.signals.metrics.shrink_penalty`:
the delta-minus-safe half of RAS, one-sided). The anchor prompts are disjoint from the monitor's
probe prompts, so the monitor's behavioural signals stay a witness that the action never trained on.

**Parameter anchoring** (L2-SP). ``lambda * sum (theta - theta_0)^2`` over the trainable parameters
(under LoRA, the adapter factors, pulled back to their initial values), or only over the safety
neurons' slices. It keeps a copy of the anchored parameters.

Both are *loss terms of an optimizer step*: the guard computes them once per step (before the
first micro-batch's forward) and ties them into that micro-batch's backward pass, so their
gradient joins the trainer's own optimizer step with no trainer subclass, whatever the gradient
accumulation. Under DDP each rank runs its share of the anchor rows and DDP's gradient average
makes the update the mean over all rows; every rank applies the same update.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.hooks.capture import Activation, ActivationCapture
from rimguard.probing import encode, forked_rng, format_prompt, generate_ids, model_device, pad, pad_id, probe_mode
from rimguard.signals import metrics

RECORD_TENSORS = ("ids", "attn", "pos", "resp_mask", "base_logp", "base_index", "act_ref", "harmful")


class AnchorError(ValueError):
    """The anchor cannot be built from the given prompts or settings."""


class SafetyTap:
    """Per-sequence max over tokens of the safety neurons, collected source by source (a capture tap).

    Args:
        safety_per_source: per capture source, ``[n_s]`` safety unit ids local to it (empty where none).
    """

    def __init__(self, safety_per_source: Sequence[torch.Tensor]) -> None:
        self.index = list(safety_per_source)
        self.rows: dict[int, torch.Tensor] = {}

    def __call__(self, source: int, act: Activation, recompute: bool) -> None:
        if self.index[source].numel() and not recompute:
            self.rows[source] = act.peak(self.index[source]).float()

    def take(self) -> torch.Tensor:
        """``[B, n]`` activations of the last forward, in source order (MoE units without a routed token: NaN)."""
        rows = [self.rows[source] for source in sorted(self.rows)]
        self.rows = {}
        return torch.cat(rows, dim=1)


@contextmanager
def checkpointing_off(model: nn.Module) -> Iterator[None]:
    """Run the block without activation checkpointing (the anchor batch is small; this keeps the
    capture from seeing recomputed layers of a forward that is not a training forward)."""
    flipped = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    for m in flipped:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flipped:
            m.gradient_checkpointing = True


@dataclass
class AnchorRecord:
    """What the anchor keeps of the base model, ``P`` anchor rows.

    Attributes:
        ids, attn: ``[P, L]`` right-padded prompt + base response, and its attention mask.
        pos: ``[P, R]`` the positions whose next-token logits predict the response tokens.
        resp_mask: ``[P, R]`` 1 where ``pos`` is a real response token.
        base_logp, base_index: ``[P, R, k]`` the base model's top-k log-probs there, and their token ids.
        act_ref: ``[P, n]`` base safety-neuron activations (max over tokens) of each row.
        harmful: ``[P]`` 1 for harmful rows (the neuron term uses only these).
        prompts: the ``P`` prompts.
    """

    ids: torch.Tensor
    attn: torch.Tensor
    pos: torch.Tensor
    resp_mask: torch.Tensor
    base_logp: torch.Tensor
    base_index: torch.Tensor
    act_ref: torch.Tensor
    harmful: torch.Tensor
    prompts: list[str]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().cpu().contiguous() for k in RECORD_TENSORS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prompts: list[str]) -> "AnchorRecord":
        missing = [k for k in RECORD_TENSORS if k not in tensors]
        if missing:
            raise AnchorError(f"anchor state lacks {missing}")
        return cls(**{k: tensors[k] for k in RECORD_TENSORS}, prompts=list(prompts))

    def to(self, device: torch.device) -> "AnchorRecord":
        return AnchorRecord(**{k: v.to(device) for k, v in self.tensors().items()}, prompts=self.prompts)


def record_anchor(
    model: nn.Module,
    tokenizer: Any,
    capture: ActivationCapture,
    safety_per_source: Sequence[torch.Tensor],
    harmful: Sequence[str],
    harmless: Sequence[str] = (),
    max_new_tokens: int = 32,
    max_length: int = 256,
    top_k: int = 32,
    batch_size: int = 8,
) -> AnchorRecord:
    """Record the base model's greedy responses, their top-k log-probs and the safety activations.

    Harmful and harmless prompts are interleaved, so any window of consecutive rows mixes both.
    Rows whose response is empty (or truncated away by ``max_length``) are dropped.
    """
    if not harmful:
        raise AnchorError("the safety anchor needs at least one harmful anchor prompt")
    prompts: list[str] = []
    flags: list[bool] = []
    for i in range(max(len(harmful), len(harmless))):
        for group, flag in ((harmful, True), (harmless, False)):
            if i < len(group):
                prompts.append(group[i])
                flags.append(flag)
    responses = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, max_length=max_length)
    rows, heads, kept, keep_flags = [], [], [], []
    for prompt, response, flag in zip(prompts, responses, flags):
        head = encode(tokenizer, format_prompt(tokenizer, prompt))
        seq = (head + response)[:max_length]
        if len(seq) > len(head):
            rows.append(seq)
            heads.append(len(head))
            kept.append(prompt)
            keep_flags.append(flag)
    if not any(keep_flags):
        raise AnchorError("no harmful anchor prompt has a response within max_length")
    batch = pad(rows, pad_id(tokenizer))
    lengths = batch.attention_mask.sum(1)
    width = int((lengths - torch.tensor(heads)).max())
    offsets = torch.arange(width)
    pos = (torch.tensor(heads)[:, None] - 1 + offsets).clamp_max(batch.input_ids.shape[1] - 2)
    resp_mask = (torch.tensor(heads)[:, None] + offsets) < lengths[:, None]
    device = model_device(model)
    tap = SafetyTap(safety_per_source)
    logps, indices, acts = [], [], []
    with probe_mode(model):
        for start in range(0, len(rows), batch_size):
            sl = slice(start, start + batch_size)
            with capture.routed(tap):
                logits = model(input_ids=batch.input_ids[sl].to(device), attention_mask=batch.attention_mask[sl].to(device)).logits
            top = response_logprobs(logits, pos[sl].to(device)).topk(top_k, dim=-1)
            logps.append(top.values)
            indices.append(top.indices)
            acts.append(tap.take())
    return AnchorRecord(batch.input_ids, batch.attention_mask, pos, resp_mask.long(), torch.cat(logps).cpu(),
                        torch.cat(indices).cpu(), torch.cat(acts).cpu(), torch.tensor(keep_flags, dtype=torch.long), kept)


def response_logprobs(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Log-softmax of ``logits`` ``[B, L, V]`` at positions ``pos`` ``[B, R]``: ``[B, R, V]`` float32."""
    picked = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1]))
    return picked.float().log_softmax(-1)


class SafetyAnchor:
    """The self-distilled safety anchor's loss, batch schedule and logged terms.

    Args:
        record: the base record (see :func:`record_anchor`).
        safety_per_source: per capture source, ``[n_s]`` safety unit ids local to it.
        batch_size: anchor rows per anchor step (over all ranks).
        every: anchor every this many optimizer steps.
        act_weight: ``mu``, weight of the neuron term relative to the KL term.
        rel_floor: activation floor of the neuron term, relative to the mean base activation.
    """

    def __init__(self, record: AnchorRecord, safety_per_source: Sequence[torch.Tensor], batch_size: int = 8, every: int = 1,
                 act_weight: float = 1.0, rel_floor: float = metrics.DEFAULT_REL_FLOOR) -> None:
        self.record = record
        self.tap = SafetyTap(safety_per_source)
        self.batch_size, self.every, self.act_weight, self.rel_floor = batch_size, every, act_weight, rel_floor
        self._lengths = record.attn.sum(1).cpu()  # row lengths on the host: trimming a batch needs no device sync
        self._logged: torch.Tensor | None = None  # [3]: sum kl, sum act, count (device, no sync)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: steps completed before it) carries the anchor."""
        return step % self.every == 0

    def rows(self, step: int) -> torch.Tensor:
        """This rank's anchor rows at optimizer step ``step``: a rotating window over all rows, sharded by rank."""
        total = self.record.ids.shape[0]
        start = (step // self.every) * self.batch_size
        window = (start + torch.arange(self.batch_size)) % total
        return window[dist.rank() :: dist.world_size()]

    def loss(self, model: nn.Module, capture: ActivationCapture, step: int) -> torch.Tensor:
        """``KL + mu * shrink`` on this step's anchor rows, differentiable (a forward with gradient)."""
        rec = self.record
        host_rows = self.rows(step)
        width = int(self._lengths[host_rows].max())
        rows = host_rows.to(rec.ids.device)
        attn = rec.attn[rows]
        with forked_rng(), checkpointing_off(model), capture.routed(self.tap):
            logits = model(input_ids=rec.ids[rows, :width], attention_mask=attn[:, :width]).logits
        logp = response_logprobs(logits, rec.pos[rows].clamp_max(width - 1))
        kl = metrics.topk_kl(rec.base_logp[rows], rec.base_index[rows], logp, rec.resp_mask[rows])
        acts = self.tap.take()
        harmful = rec.harmful[rows].bool()
        act = metrics.shrink_penalty(rec.act_ref[rows][harmful], acts[harmful], self.rel_floor)
        logged = torch.stack([kl.detach(), act.detach(), torch.ones((), device=kl.device)])
        self._logged = logged if self._logged is None else self._logged + logged
        return kl + self.act_weight * act

    def drain_logged(self) -> dict[str, float]:
        """Mean ``anchor_kl`` and ``anchor_act`` since the last call, over ranks (a collective)."""
        stats = self._logged.cpu() if self._logged is not None else torch.zeros(3)
        self._logged = None
        kl, act, count = dist.all_reduce_sum(stats).tolist()
        return {"anchor_kl": kl / count, "anchor_act": act / count} if count else {}


class ParamAnchor:
    """L2-SP: ``sum (theta - theta_0)^2`` over the anchored parameters or parameter slices.

    Args:
        slices: ``(param, indexer)`` pairs: ``param[indexer]`` is anchored (``()``: the whole parameter).
    """

    def __init__(self, slices: Sequence[tuple[nn.Parameter, tuple]]) -> None:
        self.slices = [(p, tuple(i.to(p.device) if isinstance(i, torch.Tensor) else i for i in at))
                       for p, at in slices if p.requires_grad]
        self.start = [p[at].detach().clone() for p, at in self.slices]
        self._logged: torch.Tensor | None = None

    def loss(self) -> torch.Tensor:
        """Differentiable ``sum (theta - theta_0)^2``, a ``[]`` tensor."""
        terms = [(p[at] - s).pow(2).sum() for (p, at), s in zip(self.slices, self.start)]
        value = torch.stack(terms).sum()
        logged = torch.stack([value.detach().float(), torch.ones((), device=value.device)])
        self._logged = logged if self._logged is None else self._logged + logged
        return value

    def drain_logged(self) -> dict[str, float]:
        """Mean ``param_dist2`` (the unweighted sum of squares) since the last call, over ranks."""
        stats = self._logged.cpu() if self._logged is not None else torch.zeros(2)
        self._logged = None
        total, count = dist.all_reduce_sum(stats).tolist()
        return {"param_dist2": total / count} if count else {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(k): s.cpu() for k, s in enumerate(self.start)}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if len(tensors) != len(self.start):
            raise AnchorError(f"parameter-anchor state has {len(tensors)} tensors, the model {len(self.start)}")
        self.start = [tensors[str(k)].to(s.device, s.dtype) for k, s in enumerate(self.start)]
