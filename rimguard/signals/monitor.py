"""Online entanglement measurement: base references, the task stream and probe checks.

The monitor reads the guard's :class:`~rimguard.hooks.capture.ActivationCapture` (the hook layer)
through its taps (:mod:`rimguard.signals.stream`); the capture's owner (the engine) sets it to the
atlas' tracked neurons and attaches it.

* **Task side** (the reasoning data) - streamed from the training forwards themselves (no extra
  forward): each optimizer step's masked-max means are folded into an EMA on the device. Unless
  task probes are given, the base reference is the first optimizer step's stream (measured before
  the first update).
* **Safety side** - a probe pass over the atlas' safety probes (prompt + the base model's own
  greedy response) at each check.
* **KL(pi_0 || pi_t)** - on task probes: the given ones, or else a few rows of the first training
  micro-batch (kept by a batch tap; their base log-probs are taken in :meth:`EntanglementMonitor.before_update`,
  after that step's backward and before its optimizer step, outside any training forward).
* **Refusal margin** - teacher-forced log-prob of refusal openings minus compliance openings.
* **Router share** (mixture-of-experts models) - the share of routing slots (token x top-k, real
  tokens, all MoE layers) sent to the experts that hold safety neurons: on the safety probes at
  each check (``router_share``, and ``router_share_drop`` since train start) and on the training
  batches since the last check (``router_share_train``). Routing away from those experts is a MoE
  form of the same forgetting.

Under DDP each rank probes its share of the prompts and the sums are all-reduced, so every rank
gets identical metrics; under sharded parameters every rank runs every probe
(:func:`rimguard.dist.replicate_probes`).

Mixture-of-experts units are averaged over the probes (or training sequences) that routed a token
to their expert. A unit that none did has no value (NaN in the reference and measurement vectors,
for MoE units only: a NaN of a dense neuron is a fault); the metrics leave it out (see
:mod:`rimguard.signals.metrics`), and its task EMA keeps its last value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rimguard import dist
from rimguard.atlas import NeuronAtlas
from rimguard.config import GuardConfig
from rimguard.hooks.capture import ActivationCapture
from rimguard.hooks.reduce import get_reducer, present_sum
from rimguard.passes import (
    Batch,
    activations,
    model_device,
    next_token_logprobs,
    pad,
    pad_id,
    probe_mode,
    prompt_ids,
    prompt_pass,
    token_lists,
    tokenize_dialogues,
)
from rimguard.saved import Saved
from rimguard.signals import metrics
from rimguard.signals.stream import RouterCount, TaskStream
from rimguard.signals.witness import RefusalJudge, Witness

logger = logging.getLogger("rimguard")
# the KL probes run in chunks whose [rows, T, vocab] log-probs hold at most this many floats (256 MB in fp32)
KL_CHUNK_ELEMENTS = 1 << 26
STATE_TENSORS = ("ref_safe", "ref_task", "ema_task", "kl_base_logp", "kl_base_index", "kl_ids", "kl_mask")


@dataclass
class _Group:
    """Check probes that run as one :func:`~rimguard.passes.prompt_pass`: their ids, prompt tokens and responses
    (None: the prompt alone), and whether they score the refusal and compliance openings (the margin)."""

    ids: list[int]
    prompts: list[list[int]]
    responses: list[list[int]] | None
    margin: bool


class EntanglementMonitor:
    """Measures RAS, its null score, KL and the refusal margin against train-start references.

    Args:
        capture: the hook layer on the model the training loop calls (attached or not).
        tokenizer: its tokenizer.
        atlas: the neuron atlas (checked against ``model``).
        config: guard configuration.
        task_prompts: optional task (reasoning) probes; else the training data is used.
        refusal_openings, compliance_openings: response openings for the refusal margin.
        judge: ``judge(text) -> bool`` (True: a refusal) for ``probe_refusal``; the string judge by default.
        steps_in_backward: the optimizer steps inside the backward (DeepSpeed under the HF Trainer), so the base log-probs
            of the first training rows are taken in the first training forward instead of :meth:`before_update`.
    """

    def __init__(
        self,
        capture: ActivationCapture,
        tokenizer,
        atlas: NeuronAtlas,
        config: GuardConfig,
        task_prompts: Sequence[str] = (),
        refusal_openings: Sequence[str] = (),
        compliance_openings: Sequence[str] = (),
        judge: RefusalJudge | None = None,
        steps_in_backward: bool = False,
    ) -> None:
        self.capture, self.tokenizer, self.atlas, self.config = capture, tokenizer, atlas, config
        self.model, self.layers = capture.model, capture.layers
        self.device = model_device(self.model)
        # DeepSpeed steps the optimizer inside the backward: the base log-probs of the first training rows are then
        # taken in the first training forward, before it (see _keep_first_batch)
        self.steps_in_backward = steps_in_backward
        self.routed = capture.routed_units().to(self.device)  # [N]: MoE units, whose NaN means "no value"
        self.stream = TaskStream(capture.source_tracked, get_reducer(self.device))
        safety = [ids for ids, _ in capture.split([t.to(self.device) for t in atlas.safety_per_layer()])]
        self.routers = {kind: RouterCount(capture.sources, safety) for kind in ("train", "probe")}
        capture.add_tap(self.stream, on="train")
        if self.routers["train"].active:
            for kind, counter in self.routers.items():
                capture.add_tap(counter, on=kind)
        self.safety_index = atlas.safety.to(self.device)
        self.sets = torch.cat([atlas.safety[None], atlas.controls]).to(self.device)  # [1 + K, n]
        n = min(config.monitor.check_probes, config.atlas.num_safety_probes)
        self._pad = pad_id(tokenizer)
        self.safety_sequences = tokenize_dialogues(
            tokenizer, atlas.probe_prompts[:n], atlas.probe_responses[:n], config.atlas.max_length
        )
        self.margin_prompts = atlas.probe_prompts[: min(n, config.monitor.margin_probes)]
        self.refusal_openings = list(refusal_openings)
        self.compliance_openings = list(compliance_openings)
        self.task_prompts = list(task_prompts)
        self.eos = tokenizer.eos_token_id
        self._plan_safety_pass()
        width = max((len(r) for g in self.groups if g.responses for r in g.responses), default=0)
        self.witness = Witness(tokenizer, n, width, config.monitor.kl_top_k, config.monitor.refusal_kl and width > 0,
                               config.monitor.witness_tokens, judge)
        self.ref_safe: torch.Tensor | None = None
        self.ref_task: torch.Tensor | None = None
        self.ema_task: torch.Tensor | None = None
        self.ref_margin: float | None = None
        self.ref_router: float | None = None
        self.safe_now: torch.Tensor | None = None  # safety activations of the last check
        self.last_sets: dict[str, torch.Tensor] = {}  # the last check's per-set metrics, [1 + K] each
        self.kl_ids: torch.Tensor | None = None
        self.kl_mask: torch.Tensor | None = None
        self.kl_base_logp: torch.Tensor | None = None
        self.kl_base_index: torch.Tensor | None = None
        self._kl_batch: Batch | None = None  # the first training rows, until their base log-probs are taken

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, restored: Saved | None = None) -> None:
        """Take base references (or restore them from a checkpoint); the capture must be attached."""
        if restored is not None:
            self.load_state_dict(restored)
        else:
            self.routers["probe"].drain()
            self.ref_safe, self.ref_margin, _ = self._safety_pass(record=True)
            self.ref_router = self._router_share("probe")
            if self.task_prompts:
                seqs = tokenize_dialogues(self.tokenizer, self.task_prompts, None, self.config.atlas.max_length)
                self.ref_task = self._mean_activations(seqs)
                self.ema_task = self.ref_task.clone()
                if self.config.monitor.kl_probes:
                    self._set_kl_reference(pad(seqs[: self.config.monitor.kl_probes], self._pad))
        if self.config.monitor.kl_probes and self.kl_base_logp is None:
            self.capture.batch_taps.append(self._keep_first_batch)

    def probe_prompts(self) -> list[str]:
        """Every prompt the monitor measures (safety probes; the margin's prompts are among them)."""
        return list(self.atlas.probe_prompts[: len(self.safety_sequences)])

    # -- task stream -------------------------------------------------------------------------
    def before_update(self) -> None:
        """After a step's backward, before its optimizer step (the weights are still the base ones on the
        first step): take the base log-probs of the kept KL rows, if any are waiting."""
        if self._kl_batch is not None:  # the main rank's rows on every rank: one KL on every rank, as in one process
            batch, self._kl_batch = dist.broadcast(self._kl_batch.to(torch.device("cpu"))), None
            self._set_kl_reference(batch)

    def step_end(self) -> None:
        """Fold this optimizer step's streamed activations into the EMA (on device, no sync)."""
        if self._kl_batch is not None:  # kept, but never taken before the update: KL stays off
            self._kl_batch = None
            logger.warning("rimguard: KL to the base model is off: the first training rows were kept but their base "
                           "log-probs were never taken before the optimizer step. A custom loop calls "
                           "engine.before_optimizer_step() before optimizer.step() (or passes task_prompts=)")
        drained = self.stream.drain()
        if drained is None:
            return
        sums, count = drained
        if dist.active():  # the global batch's mean: one EMA on every rank (saved once, resumed exactly); no host sync
            both = dist.all_reduce_sum(torch.stack([sums, count]))
            sums, count = both[0], both[1]
        mean = self._mean(sums, count)
        if self.ref_task is None:  # first optimizer step: the base reference
            self.ref_task = mean
            self.ema_task = mean.clone()
        elif self.ema_task is None:
            self.ema_task = mean
        else:
            decay = self.config.monitor.ema_decay
            blended = torch.where(torch.isnan(self.ema_task), mean, self.ema_task * decay + mean * (1 - decay))
            self.ema_task = torch.where(torch.isnan(mean) & self.routed, self.ema_task, blended)

    def _mean(self, sums: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """``sums / count`` per tracked neuron, and NaN (no value) for a MoE unit with a zero count."""
        mean = sums / count.clamp_min(1)
        return torch.where(self.routed & (count == 0), torch.full_like(mean, float("nan")), mean)

    # -- probes ------------------------------------------------------------------------------
    def _plan_safety_pass(self) -> None:
        """Tokenize once: which check probes run as one prompt pass, and what each pass reads.

        A probe whose sequence starts with its own prompt tokens (all of them, unless ``max_length`` cut the
        prompt) runs once (:func:`rimguard.passes.prompt_pass`): its response runs on from the KV cache for
        the activations (and to the LM head for ``refusal_kl``), its greedy opening is decoded there for
        ``probe_refusal``, and the first ``margin_probes`` also score the refusal and compliance openings.
        Without witnesses, the probes past the margin's run as whole sequences (activations alone, which stop
        after the last tracked layer); so do probes cut by ``max_length``, whose margin then runs on the prompt alone.
        """
        mon = self.config.monitor
        m = len(self.margin_prompts) if self.refusal_openings and self.compliance_openings else 0
        self.openings = token_lists(self.tokenizer, self.refusal_openings + self.compliance_openings) if m else []
        witnessed = mon.refusal_kl or mon.witness_tokens > 0
        reserve = max([len(c) for c in self.openings] + [mon.witness_tokens if witnessed else 0])
        seqs = self.safety_sequences
        tokens = prompt_ids(self.model, self.tokenizer, self.probe_prompts(), reserve, self.config.atlas.max_length)
        shared = [i for i, prompt in enumerate(tokens) if seqs[i][: len(prompt)] == prompt and (i < m or witnessed)]
        groups = [_Group([i for i in shared if i < m], [], [], True), _Group([i for i in shared if i >= m], [], [], False),
                  _Group([i for i in range(m) if i not in shared], [], None, True)]
        for group in groups:
            group.prompts = [tokens[i] for i in group.ids]
            if group.responses is not None:
                group.responses = [seqs[i][len(tokens[i]) :] for i in group.ids]
        self.groups = [g for g in groups if g.ids]
        self.plain_sequences = [seq for i, seq in enumerate(seqs) if i not in shared]  # activations only

    def _safety_pass(self, record: bool = False) -> tuple[torch.Tensor, float | None, dict[str, float]]:
        """Mean over the safety probes (sharded over ranks) of per-neuron max activations, ``[N]``, the
        refusal margin (nats; None without margin prompts or openings) and the witnesses' values (``record``:
        their base references are taken instead, and ``{}`` is returned). All-reduced."""
        n_tracked, bs = self.atlas.tracked.shape[0], self.config.monitor.probe_batch_size
        act_sum = torch.zeros(n_tracked, device=self.device)
        act_count = torch.zeros(n_tracked, device=self.device)
        margins: list[torch.Tensor] = []
        acts: list[torch.Tensor] = []
        witness = self.witness if self.witness.active else None
        if witness is not None:
            witness.begin(self.device, record)
        for group in self.groups:
            mine = dist.shard(range(len(group.ids)))
            if not mine:
                continue
            ids, reads = [group.ids[i] for i in mine], witness is not None and group.responses is not None
            result = prompt_pass(self.model, [group.prompts[i] for i in mine], self.openings if group.margin else [], self._pad, bs,
                                 self.capture if group.responses is not None else None,
                                 None if group.responses is None else [group.responses[i] for i in mine],
                                 witness.reader(ids) if reads else None, witness.tokens if reads else 0, self.eos)
            if result.activations is not None:
                acts.append(result.activations)
            if group.margin:
                margins.append(metrics.refusal_margin(result.scores, len(self.refusal_openings)))
            if result.openings is not None:
                witness.judge_openings(result.openings)
        plain = dist.shard(self.plain_sequences)
        if plain:
            acts.append(activations(self.model, self.capture, plain, self._pad, bs))
        for rows in acts:
            sums, count = self._sum_rows(rows)
            act_sum, act_count = act_sum + sums, act_count + count
        margin = torch.cat(margins) if margins else torch.zeros(0, device=self.device)
        counts = torch.tensor([float(len(margin))], device=self.device)
        total = dist.sum_shards(torch.cat([act_sum, act_count, margin.sum()[None], counts]))
        mean = self._mean(total[:n_tracked], total[n_tracked : 2 * n_tracked])
        has_margin = any(g.margin for g in self.groups)
        witnessed = witness.finish() if witness is not None else {}
        return mean, (float(total[-2] / total[-1].clamp_min(1)) if has_margin else None), witnessed

    def _sum_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums [N], count [N])`` of per-sequence rows ``[P, N]``; a MoE unit's NaN (no routed token) is skipped."""
        dense_sums, dense_count = rows.sum(0), torch.full((rows.shape[1],), float(rows.shape[0]), device=rows.device)
        if not bool(self.routed.any()):
            return dense_sums, dense_count
        sums, count = present_sum(rows)
        return torch.where(self.routed, sums, dense_sums), torch.where(self.routed, count, dense_count)

    def _mean_activations(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean over ``sequences`` (sharded over ranks) of per-neuron max activations, ``[N]``."""
        mine = dist.shard(sequences)
        n_tracked = self.atlas.tracked.shape[0]
        total, count = torch.zeros(n_tracked, device=self.device), torch.zeros(n_tracked, device=self.device)
        if mine:
            total, count = self._sum_rows(activations(self.model, self.capture, mine, self._pad, self.config.monitor.probe_batch_size))
        return self._mean(dist.sum_shards(total), dist.sum_shards(count))

    def _keep_first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> bool:
        """Batch tap: on the first training forward, keep a copy of a few of its sequences (their forward runs in
        :meth:`before_update`, or here when the optimizer steps inside the backward). Returns whether it still waits
        for one."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            return True
        keep, width = self.config.monitor.kl_probes, self.config.monitor.kl_max_length
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else torch.ones_like(ids)
        ids, mask = ids[:keep], mask[:keep]
        if ids.shape[1] > width:  # the first real tokens: the leading columns, or the trailing ones under left padding
            cols = slice(None, width) if bool(mask[:, 0].all()) else slice(-width, None)
            ids, mask = ids[:, cols], mask[:, cols]
        self._kl_batch = Batch(ids.detach().clone(), mask.detach().clone())
        if self.steps_in_backward:
            self.before_update()
        return False

    def _set_kl_reference(self, batch: Batch) -> None:
        batch = batch.to(self.device)
        self.kl_ids, self.kl_mask = batch.input_ids, batch.attention_mask
        logps, indices = [], []
        with probe_mode(self.model):
            for rows in self._kl_chunks():
                top = next_token_logprobs(self.model, Batch(batch.input_ids[rows], batch.attention_mask[rows])).topk(
                    self.config.monitor.kl_top_k, dim=-1)
                logps.append(top.values)
                indices.append(top.indices)
        self.kl_base_logp, self.kl_base_index = torch.cat(logps), torch.cat(indices)

    def _kl_chunks(self) -> list[slice]:
        """Row slices of the KL probes, batched so that one chunk's log-probs ``[rows, T, V]`` stay
        within ``KL_CHUNK_ELEMENTS`` floats."""
        assert self.kl_ids is not None
        n, width = self.kl_ids.shape
        vocab = dist.shape(self.model.get_output_embeddings().weight)[0]
        size = max(1, min(self.config.monitor.probe_batch_size, KL_CHUNK_ELEMENTS // max(1, width * vocab)))
        return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def _kl(self) -> float | None:
        if self.kl_base_logp is None or self.kl_ids is None or self.kl_mask is None:
            return None
        # every rank holds the same rows (the shared task probes, or the main rank's first batch) and scores them all
        total = torch.zeros((), device=self.device)
        with probe_mode(self.model):
            for rows in self._kl_chunks():
                logp = next_token_logprobs(self.model, Batch(self.kl_ids[rows], self.kl_mask[rows]))
                base_logp, base_index, mask = self.kl_base_logp[rows], self.kl_base_index[rows], self.kl_mask[rows]
                for r in range(logp.shape[0]):  # the metric is the mean over rows of each row's mean over its tokens
                    total += metrics.topk_kl(base_logp[r : r + 1], base_index[r : r + 1], logp[r : r + 1], mask[r : r + 1])
        return float(total) / self.kl_ids.shape[0]

    # -- metrics -----------------------------------------------------------------------------
    def ready(self) -> bool:
        return self.ref_safe is not None and self.ref_task is not None and self.ema_task is not None

    def measure(self) -> dict[str, float]:
        """Run the probe pass and return every metric as floats (one host sync, at check time only)."""
        if not self.ready():
            return {}
        assert self.ref_safe is not None and self.ref_task is not None and self.ema_task is not None
        safe_now, margin, witnessed = self._safety_pass()
        self.safe_now = safe_now
        task_now = self.ema_task
        s = self.sets
        present = self._present(self.ref_safe, safe_now, self.ref_task, task_now)
        per_set = metrics.ras(self.ref_safe[s], safe_now[s], self.ref_task[s], task_now[s], self.config.monitor.rel_floor,
                              None if present is None else present[s])
        self.last_sets = per_set
        null = metrics.null_score(per_set["ras"][0], per_set["ras"][1:])
        idx = self.safety_index
        values = {
            "ras_safe": per_set["ras"][0],
            "ras_control_mean": per_set["ras"][1:].mean(),
            "safety_drop": per_set["safety_drop"][0],
            "task_rise": per_set["task_rise"][0],
            "entanglement_z": null["z"],
            "entanglement_pct": null["percentile"],
            "safety_act_ratio": self._ratio(safe_now, self.ref_safe, idx, self._present(self.ref_safe, safe_now)),
            "task_act_ratio": self._ratio(task_now, self.ref_task, idx, self._present(self.ref_task, task_now)),
        }
        out = dict(zip(values, torch.stack(list(values.values())).tolist()))
        if margin is not None and self.ref_margin is not None:
            out["refusal_margin"] = margin
            out["refusal_drop"] = self.ref_margin - margin
        out.update(witnessed)
        kl = self._kl()
        if kl is not None:
            out["kl_task"] = kl
        if self.routers["train"].active:
            share, train = self._router_share("probe"), self._router_share("train")
            if share is not None:
                out["router_share"] = share
                if self.ref_router is not None:
                    out["router_share_drop"] = self.ref_router - share
            if train is not None:
                out["router_share_train"] = train
        return out

    def per_set(self) -> dict[str, list[float]]:
        """The last check's ``ras``, ``safety_drop`` and ``task_rise`` of every neuron set: entry 0 is the safety
        set, entries 1..K the atlas' layer-matched random control sets (their null distribution); ``{}`` before a check."""
        return {k: v.tolist() for k, v in self.last_sets.items() if k in ("ras", "safety_drop", "task_rise")}

    def _router_share(self, kind: str) -> float | None:
        """Share of routing slots sent to safety experts since the last call, over all ranks (a collective;
        None without MoE units)."""
        if not self.routers[kind].active:
            return None
        counts = self.routers[kind].drain()
        total = dist.all_reduce_sum(counts if counts is not None else torch.zeros(2, device=self.device))
        return float(total[0] / total[1]) if float(total[1]) > 0 else None

    def _present(self, *vectors: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` bool: the tracked neurons with a value in every vector (None for a dense model: all)."""
        if not bool(self.routed.any()):
            return None
        missing = torch.stack([torch.isnan(v) for v in vectors]).any(0) & self.routed
        return ~missing

    @staticmethod
    def _ratio(now: torch.Tensor, ref: torch.Tensor, idx: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """Mean of ``now`` over mean of ``ref`` on the neurons ``idx`` that have a value in both."""
        keep = idx if present is None else idx[present[idx]]
        return now[keep].mean() / ref[keep].mean()

    def nonfinite_layers(self) -> list[int]:
        """Layers whose tracked activations (last safety probe or task stream) hold a NaN or inf
        (other than a MoE unit's NaN, which means it had no routed token)."""
        bad = torch.zeros(self.atlas.tracked.shape[0], dtype=torch.bool)
        routed = self.routed.cpu()
        for values in (self.safe_now, self.ema_task):
            if values is not None:
                v = values.detach().cpu()
                bad |= ~torch.isfinite(v) & ~(routed & torch.isnan(v))
        return sorted(set(self.atlas.tracked[bad, 0].tolist()))

    def shift_per_neuron(self) -> torch.Tensor:
        """Per safety neuron, ``[n]``: relative task rise plus relative safety drop (for freeze_top).

        Uses the safety activations of the last :meth:`measure` (the check that raised the level).
        """
        assert self.ref_safe is not None and self.ref_task is not None and self.ema_task is not None
        idx = self.safety_index
        if self.safe_now is None:
            self.safe_now = self._safety_pass()[0]
        safe_now = self.safe_now[idx]
        task_now = self.ema_task
        present = self._present(self.ref_safe, self.ref_task)
        floor = metrics.activation_floor(self.ref_safe[idx], self.ref_task[idx], self.config.monitor.rel_floor,
                                         None if present is None else present[idx])
        rise = (task_now[idx] - self.ref_task[idx]) / self.ref_task[idx].clamp_min(floor)
        drop = (self.ref_safe[idx] - safe_now) / safe_now.clamp_min(floor)
        return torch.nan_to_num(rise + drop, nan=float("-inf"))  # a MoE unit without a value is never the most shifted

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> Saved:
        tensors = {k: getattr(self, k).detach().cpu() for k in STATE_TENSORS if getattr(self, k) is not None}
        witness = self.witness.state_dict()
        tensors.update({f"witness.{k}": v for k, v in witness.tensors.items()})
        return Saved(tensors, {"ref_margin": self.ref_margin, "ref_router": self.ref_router, **witness.meta})

    def load_state_dict(self, state: Saved) -> None:
        for k, v in state.tensors.items():
            if not k.startswith("witness."):
                setattr(self, k, v.to(self.device))
        self.ref_margin = state.meta.get("ref_margin")
        self.ref_router = state.meta.get("ref_router")
        if self.witness.active:
            witness = Saved({k[len("witness."):]: v for k, v in state.tensors.items() if k.startswith("witness.")}, state.meta)
            self.witness.load_state_dict(witness, self.device)
