"""The safety anchor (``regularizer="anchor"``, the default ``regularize`` action).

At train start the guard records the base
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

It is a *step loss* (:mod:`rimguard.actions.regularizer`): computed once per optimizer step (before
the first micro-batch's forward) and tied into that micro-batch's backward pass, so its gradient
joins the trainer's own optimizer step with no trainer subclass, whatever the gradient
accumulation. Under DDP and FSDP every rank runs the whole anchor batch (8 rows every 4 steps by
default), so the averaged gradient is the one-process anchor gradient, exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.actions.regularizer import BuildContext, Regularizer
from rimguard.hooks.capture import Activation, ActivationCapture
from rimguard.passes import encode, forked_rng, format_prompt, generate_ids, model_device, pad, pad_id, probe_mode
from rimguard.probes import same_prompt
from rimguard.saved import Saved
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
    rows, prompt_lens, kept, keep_flags = [], [], [], []
    for prompt, response, flag in zip(prompts, responses, flags):
        tokens = encode(tokenizer, format_prompt(tokenizer, prompt))
        seq = (tokens + response)[:max_length]
        if len(seq) > len(tokens):
            rows.append(seq)
            prompt_lens.append(len(tokens))
            kept.append(prompt)
            keep_flags.append(flag)
    if not any(keep_flags):
        raise AnchorError("no harmful anchor prompt has a response within max_length")
    batch = pad(rows, pad_id(tokenizer))
    lengths = batch.attention_mask.sum(1)
    width = int((lengths - torch.tensor(prompt_lens)).max())
    offsets = torch.arange(width)
    pos = (torch.tensor(prompt_lens)[:, None] - 1 + offsets).clamp_max(batch.input_ids.shape[1] - 2)
    resp_mask = (torch.tensor(prompt_lens)[:, None] + offsets) < lengths[:, None]
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


# the monitor's signals the neuron term drives (anchor_act_weight > 0): it holds the safety neurons up on the
# anchor's prompts, which on SmolLM2 carried over to the monitor's probes (RAS, z < 0); the KL term acts on
# behaviour on the anchor's own prompts only
NEURON_SIGNALS = ("safety_drop", "ras_safe", "entanglement_z", "entanglement_pct")


class SafetyAnchor(Regularizer):
    """The self-distilled safety anchor's loss, batch schedule and logged terms.

    Args:
        model, capture: the model the training loop calls, and the hook layer on it.
        record: the base record (see :func:`record_anchor`).
        safety_per_source: per capture source, ``[n_s]`` safety unit ids local to it.
        batch_size: anchor rows per anchor step (each rank runs them all).
        every: anchor every this many optimizer steps.
        act_weight: ``mu``, weight of the neuron term relative to the KL term.
        rel_floor: activation floor of the neuron term, relative to the mean base activation.
    """

    name = "anchor"
    backends = ("single", "ddp", "deepspeed", "fsdp", "zero3")

    def __init__(self, model: nn.Module, capture: ActivationCapture, record: AnchorRecord, safety_per_source: Sequence[torch.Tensor],
                 batch_size: int = 8, every: int = 1, act_weight: float = 1.0, rel_floor: float = metrics.DEFAULT_REL_FLOOR) -> None:
        self.model, self.capture, self.record = model, capture, record
        self.tap = SafetyTap(safety_per_source)
        self.batch_size, self.every, self.act_weight, self.rel_floor = batch_size, every, act_weight, rel_floor
        self.optimises = NEURON_SIGNALS if act_weight > 0 else ()
        self._lengths = record.attn.sum(1).cpu()  # row lengths on the host: trimming a batch needs no device sync
        self._logged: torch.Tensor | None = None  # [3]: sum kl, sum act, count (device, no sync)

    @classmethod
    def build(cls, ctx: BuildContext) -> "SafetyAnchor":
        """Record the base model's responses to the anchor prompts (or restore the record), after checking that
        the prompts are disjoint from the monitor's probes."""
        cfg, per_source = ctx.config, ctx.safety_per_source()
        if ctx.restored is not None:
            if not ctx.restored.tensors:
                raise AnchorError("the checkpoint's guard state has no anchor record (it was saved without the safety "
                                  "anchor); resume with the configuration it was trained with")
            record = AnchorRecord.from_tensors(ctx.restored.tensors, ctx.restored.meta.get("prompts") or [])
        else:
            harmful = ctx.sources.load("anchor_harmful")
            harmless = ctx.sources.load("anchor_harmless") if cfg.actions.anchor_harmless else []
            probes = set(ctx.monitor.probe_prompts())
            seen = {same_prompt(p) for p in probes}  # a changed case, spacing or final '?' is the same prompt
            overlap = [p for p in harmful + harmless if same_prompt(p) in seen]
            if overlap:
                raise AnchorError(f"{len(overlap)} anchor prompt(s) are also monitor probes (e.g. {overlap[0]!r}); the "
                                  "monitor must measure prompts the anchor never trains on: pass disjoint anchor_prompts=")
            record = dist.on_main(lambda: record_anchor(ctx.model, ctx.tokenizer, ctx.capture, per_source, harmful, harmless,
                                                        cfg.actions.anchor_max_new_tokens, cfg.atlas.max_length,
                                                        cfg.actions.anchor_top_k, cfg.monitor.probe_batch_size))
        return cls(ctx.model, ctx.capture, record.to(ctx.monitor.device), per_source, cfg.actions.anchor_batch_size,
                   cfg.actions.anchor_every, cfg.actions.anchor_act_weight, cfg.monitor.rel_floor)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based: steps completed before it) carries the anchor."""
        return step % self.every == 0

    def rows(self, step: int) -> torch.Tensor:
        """The anchor rows at optimizer step ``step``: a rotating window over all rows. Every rank runs the whole
        window, so the anchor's loss and gradient are those of one process however many ranks average them
        (a split would weight the harmful and harmless rows, and their tokens, by rank)."""
        total = self.record.ids.shape[0]
        start = (step // self.every) * self.batch_size
        return (start + torch.arange(self.batch_size)) % total

    def step_loss(self, step: int) -> torch.Tensor | None:
        """``KL + mu * shrink`` on this step's anchor rows, differentiable (a forward with gradient), when due."""
        return self.loss(step) if self.due(step) else None

    def loss(self, step: int) -> torch.Tensor:
        """``KL + mu * shrink`` on the anchor rows of optimizer step ``step`` (a forward with gradient)."""
        rec, model = self.record, self.model
        host_rows = self.rows(step)
        width = int(self._lengths[host_rows].max())
        rows = host_rows.to(rec.ids.device)
        attn = rec.attn[rows]
        with forked_rng(), checkpointing_off(model), self.capture.routed(self.tap):
            logits = model(input_ids=rec.ids[rows, :width], attention_mask=attn[:, :width]).logits
        logp = response_logprobs(logits, rec.pos[rows].clamp_max(width - 1))
        kl = metrics.topk_kl(rec.base_logp[rows], rec.base_index[rows], logp, rec.resp_mask[rows])
        acts = self.tap.take()
        harmful = rec.harmful[rows].bool()
        act = metrics.shrink_penalty(rec.act_ref[rows][harmful], acts[harmful], self.rel_floor)
        logged = torch.stack([kl.detach(), act.detach(), torch.ones((), device=kl.device)])
        self._logged = logged if self._logged is None else self._logged + logged
        return kl + self.act_weight * act

    def logged(self) -> dict[str, float]:
        """Mean ``anchor_kl`` and ``anchor_act`` since the last call, over ranks (a collective)."""
        stats = self._logged.cpu() if self._logged is not None else torch.zeros(3)
        self._logged = None
        kl, act, count = dist.all_reduce_sum(stats).tolist()
        return {"anchor_kl": kl / count, "anchor_act": act / count} if count else {}

    def state_dict(self) -> Saved:
        return Saved(self.record.tensors(), {"prompts": self.record.prompts})
