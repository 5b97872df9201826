"""``GuardEngine``: the guard without any training framework.

It wires the pipeline (atlas -> monitor -> policy -> actions) and knows nothing of
``transformers.Trainer``; :class:`rimguard.RIMGuard` adapts it to HF/TRL trainers, and a
hand-written loop drives it directly::

    engine = GuardEngine(GuardConfig(mode="regularize"))
    engine.setup(model, tokenizer, output_dir="runs/x", inject_loss=False)
    for step, batch in enumerate(loader):          # ``step``: optimizer steps done before this one
        engine.begin_step(step)                    # the anchor's forward (when due)
        loss = model(**batch).loss
        extra = engine.penalty()                   # the regularizer's loss, weighted by lambda
        (loss if extra is None else loss + extra).backward()
        optimizer.step(); optimizer.zero_grad()
        engine.after_optimizer_step()              # holds frozen neurons
        report = engine.end_step(step + 1)         # a check when the schedule says so
        if report is not None and report.stop:
            break
    engine.teardown()
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from rimguard import dist
from rimguard.actions.anchor import AnchorError, AnchorRecord, ParamAnchor, SafetyAnchor, record_anchor
from rimguard.actions.freeze import NeuronFreezer
from rimguard.actions.penalty import EntanglementPenalty, attach_penalty
from rimguard.atlas import AtlasError, NeuronAtlas
from rimguard.atlas.selection import top_fraction
from rimguard.config import LEVELS, OPTIMISED_SIGNALS, GuardConfig
from rimguard.events import EventLog, new_run_id
from rimguard.hooks.arch import MLPLayer, find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.policy import Decision, RiskPolicy
from rimguard.probes import bundled, load_prompts
from rimguard.schema import Reader, file_sha256
from rimguard.signals.heads import RefusalHeadMonitor
from rimguard.signals.monitor import EntanglementMonitor

logger = logging.getLogger("rimguard")

STATE_DIR = "rimguard"
ATLAS_DIR = "rimguard_atlas"
WITNESS = "refusal_drop"  # behavioural, on the monitor's own probes: no action optimises it
PENALTY_FACTOR = {"ok": 1.0, "warn": 1.0, "regularize": 1.0, "freeze": 2.0, "stop": 4.0}
ONE_OFF_ACTIONS = ("checkpoint", "freeze_top", "freeze")  # still taken when a rise jumps over their level
AlertHandler = Callable[[Decision, dict, int], None]
BackwardScale = Callable[[], "tuple[int, torch.Tensor | float]"]


class GuardStateError(RuntimeError):
    """The guard's checkpoint state is missing or unusable; the message names the path and the remedies."""


def default_schedule(probe_every: int) -> Callable[[int], bool]:
    """Checks every ``probe_every`` optimizer steps, and at steps 1, 2, 4, ... before that (forgetting starts early)."""
    return lambda step: step % probe_every == 0 or (step < probe_every and step & (step - 1) == 0)


@dataclass
class Report:
    """One check's outcome: the logged values and what the plan asks of the training loop."""

    step: int
    values: dict[str, float]  # metric -> value (empty when the monitor had nothing to measure yet)
    decision: Decision | None = None
    save: bool = False  # save a checkpoint now (the 'checkpoint' action)
    stop: bool = False  # stop training (the 'stop' action)


@dataclass
class Plan:
    """What the guard does at a level: that level's actions, plus the one-off actions of the levels a
    rise jumped over (a jump from ok to freeze still saves the warn checkpoint)."""

    level: str
    actions: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, config: GuardConfig, level: str, previous: str | None = None) -> "Plan":
        previous = level if previous is None else previous
        jumped = LEVELS[LEVELS.index(previous) + 1 : LEVELS.index(level)]
        one_off = [a for lvl in jumped for a in config.policy.actions_for(lvl) if a in ONE_OFF_ACTIONS]
        return cls(level, list(dict.fromkeys(one_off + config.policy.actions_for(level))))


class GuardEngine:
    """Online guard against reasoning-induced misalignment, for any training loop (see module docstring).

    Args:
        config: a :class:`GuardConfig`, a dict of its fields, or a YAML/JSON path.
        atlas: a :class:`NeuronAtlas` or its folder; identified at :meth:`setup` if None.
        tokenizer: the model's tokenizer (or pass it to :meth:`setup`).
        safety_prompts, intent_prompts, harmless_prompts: probe sources for identification
            (anything :func:`rimguard.probes.load_prompts` takes); bundled sets by default.
        reasoning_prompts: reasoning probes for the base reference and KL; by default the
            training data itself is used.
        anchor_prompts, anchor_harmless_prompts: the safety anchor's harmful prompts and harmless
            look-alikes (bundled sets by default); they must not overlap the monitor's probes.
        reasoning_spans: reasoning passages placed before the answer to find the refusal heads
            (``refusal_heads > 0``; bundled by default).
        prompt_key: the column/field holding the text in CSV/JSONL/dataset prompt sources (default:
            the first of ``prompt``, ``goal``, ``text``, ``question``, ``instruction``, ``request``).
        on_alert: called as ``on_alert(decision, metrics, step)`` whenever the level changes.
        schedule: ``schedule(step) -> bool``, whether to check after optimizer step ``step``;
            default :func:`default_schedule` of ``probe_every``.
        **overrides: GuardConfig fields, e.g. ``probe_every=20``.
    """

    def __init__(
        self,
        config: GuardConfig | dict | str | Path | None = None,
        *,
        atlas: NeuronAtlas | str | Path | None = None,
        tokenizer: Any = None,
        safety_prompts: Any = None,
        intent_prompts: Any = None,
        harmless_prompts: Any = None,
        reasoning_prompts: Any = None,
        anchor_prompts: Any = None,
        anchor_harmless_prompts: Any = None,
        reasoning_spans: Any = None,
        prompt_key: str | None = None,
        on_alert: AlertHandler | None = None,
        schedule: Callable[[int], bool] | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(config, (str, Path)):
            config = GuardConfig.load(config)
        elif isinstance(config, dict):
            config = GuardConfig.from_dict(config)
        config = config or GuardConfig()
        self.config = config.replace(**overrides) if overrides else config
        self.atlas = NeuronAtlas.load(atlas) if isinstance(atlas, (str, Path)) else atlas
        self.tokenizer = tokenizer
        self.sources = {
            "harmful": safety_prompts if safety_prompts is not None else "bundled:harmful",
            "intent": intent_prompts if intent_prompts is not None else "bundled:intent",
            "harmless": harmless_prompts if harmless_prompts is not None else "bundled:harmless",
            "anchor": anchor_prompts if anchor_prompts is not None else "bundled:anchor_harmful",
            "anchor_harmless": anchor_harmless_prompts if anchor_harmless_prompts is not None else "bundled:anchor_harmless",
            "spans": reasoning_spans if reasoning_spans is not None else "bundled:reasoning_spans",
        }
        self.prompt_key = prompt_key
        self.reasoning = load_prompts(reasoning_prompts, prompt_key, "reasoning") if reasoning_prompts is not None else []
        self.on_alert = on_alert
        self.due = schedule or default_schedule(self.config.monitor.probe_every)
        # (micro-batches per optimizer step, loss scale) of the backward the penalty joins; an integration sets it
        self.backward_scale: BackwardScale = lambda: (1, 1.0)
        self.policy = RiskPolicy(self.config.policy.thresholds, self.config.policy.hysteresis, self.config.policy.patience, self.config.policy.fault_level)
        self.monitor: EntanglementMonitor | None = None
        self.heads: RefusalHeadMonitor | None = None
        self.penalty_term: EntanglementPenalty | None = None
        self.freezer: NeuronFreezer | None = None
        self.anchor: SafetyAnchor | None = None
        self.param_anchor: ParamAnchor | None = None
        self.weight = 0.0  # lambda in force
        self._pending: torch.Tensor | None = None  # this optimizer step's anchor loss, until a backward takes it
        self.history: list[dict[str, Any]] = []
        self.events = EventLog(None)
        self.checkpointed = False
        self._crossed: set[tuple[str, str]] = set()  # (level, metric) over threshold at the last check
        self._faults: set[str] = set()  # non-finite metrics at the last check
        self.run_id = ""
        self.witness: float | None = None  # WITNESS when the current level was raised
        self._rebased = False  # resumed without guard state: references are re-taken on trained weights
        self._ended: int | None = None  # the step at which this guard's run ended (a guard guards one run)

    # -- public ------------------------------------------------------------------------------
    @property
    def level(self) -> str:
        return self.policy.level

    @property
    def lambda_(self) -> float:
        return self.weight

    @property
    def action(self) -> str:
        """What the guard is doing now, apart from the risk level (which is what the signals say)."""
        parts = []
        if self.weight > 0:
            parts.append(f"regularize ({self.config.actions.regularizer}, lambda={self.weight:g})")
        if self.freezer is not None and self.freezer.count:
            parts.append(f"freeze ({self.freezer.count} neurons)")
        return ", ".join(parts) or "none (monitor only)"

    def begin_step(self, step: int) -> None:
        """Compute this optimizer step's anchor loss (a forward with gradient on the anchor batch).

        ``step`` counts the optimizer steps done before this one; call it before the step's first forward.
        """
        self._pending = None
        if self.weight <= 0 or self.monitor is None:
            return
        if self.anchor is not None and self.anchor.due(step):
            self._pending = self.weight * self.anchor.loss(self.monitor.model, self.monitor.capture, step)
        elif self.param_anchor is not None:
            self._pending = self.weight * self.param_anchor.loss()

    def penalty(self) -> torch.Tensor | None:
        """For custom loops: the regularizer's loss since the last call, weighted by lambda (add it to the loss).

        The activation penalty of the forwards since the last call, plus the anchor loss of
        :meth:`begin_step`. Only meaningful when the guard was set up with ``inject_loss=False``.
        """
        parts = [t for t in (self.penalty_term.pop() if self.penalty_term is not None else None, self._pending) if t is not None]
        self._pending = None
        return torch.stack(parts).sum() if parts else None

    def after_optimizer_step(self) -> None:
        """Hold frozen neurons fixed; call after every ``optimizer.step()``."""
        if self.freezer is not None:
            self.freezer.restore()

    def end_step(self, step: int) -> Report | None:
        """Close optimizer step ``step`` (counted from 1): fold its streamed statistics, and check when
        the schedule says so. Returns the check's :class:`Report`, or None."""
        self._pending = None  # a step whose forwards never took the anchor loss must not carry it over
        if self.monitor is None:
            return None
        self.monitor.step_end()
        return self.check(step) if self.due(step) else None

    def attached(self) -> bool:
        return self.monitor is not None and self.monitor.attached

    # -- set-up ------------------------------------------------------------------------------
    def setup(
        self, model: nn.Module, tokenizer: Any = None, output_dir: str | Path | None = None, inject_loss: bool = True,
        restored: dict[str, Any] | None = None,
    ) -> None:
        """Build or check the atlas, take base references and attach hooks.

        ``inject_loss``: tie the regularizer's gradient into every backward through the model (for
        trainers whose loss the guard cannot touch); custom loops pass False and add :meth:`penalty`.
        ``restored``: a checkpoint's guard state (:func:`read_state`) to resume from.
        """
        if self._ended is not None:
            raise GuardStateError(
                f"this RIMGuard already guarded a run (ended at step {self._ended}); it holds that run's references, "
                "level and log. Give the next train() a new RIMGuard(...): it identifies on the current weights and "
                "measures drift from them"
            )
        self.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if self.tokenizer is None:
            raise ValueError("RIMGuard needs a tokenizer: pass tokenizer= or give the Trainer a processing_class")
        cfg = self.config
        self.run_id = restored["run_id"] if restored is not None else dist.broadcast(new_run_id())
        if dist.is_main() and output_dir is not None:
            self.events = EventLog(Path(output_dir) / cfg.monitor.log_file if cfg.monitor.log_file else None, self.run_id)
            if restored is not None:  # each step once: this run's records after the checkpoint are replaced
                self.events.drop_after(restored["step"])
        if restored is not None:
            self.atlas = restored["atlas"]
        layers = find_mlp_layers(model)  # the one walk of the model
        if self.atlas is not None:
            self.atlas.check_model(model, layers, check_weights=restored is None and not self._rebased)
        capture = ActivationCapture(model, layers).attach()  # the one hook layer, shared by every part
        try:
            if self.atlas is None:
                self.atlas = dist.broadcast(self._identify(model, capture) if dist.is_main() else None)
                if dist.is_main() and output_dir is not None:
                    self._save_atlas(Path(output_dir))
            self.monitor = monitor = EntanglementMonitor(
                capture, self.tokenizer, self.atlas, cfg, self.reasoning, bundled("refusal_openings"), bundled("compliance_openings"),
            )
            monitor.start(restored["monitor"] if restored else None)
            self.heads = self._start_heads(model, layers, restored)
        except BaseException:
            capture.remove()
            raise
        self.penalty_term = EntanglementPenalty([ids.to(monitor.device) for ids, _ in capture.split(self.atlas.safety_per_layer())])
        capture.taps.append(self.penalty_term)
        self._set_penalty_reference()
        self.freezer = NeuronFreezer(capture)
        self._build_regularizer(model, restored)
        if inject_loss:
            capture.output_taps.append(self._add_penalty)
        if restored is not None:
            self.freezer.load_state(restored["freezer"], model)
            self.policy.level, self.policy.streak = restored["policy"]["level"], restored["policy"]["streak"]
            self.history = restored["history"]
            self.checkpointed = restored["checkpointed"]
            self._set_weight(restored["lambda"])
            self.witness = restored["witness"]
        else:
            self._execute(Plan.of(cfg, self.policy.level), step=0)
        self.events.write({"event": "start", "step": 0, "atlas": self.atlas.settings, "num_safety": self.atlas.num_safety,
                           "mode": cfg.policy.mode, "thresholds": cfg.policy.thresholds, "resumed": restored is not None,
                           "regularizer": cfg.actions.regularizer if cfg.policy.regularizes() else None,
                           "optimised_signals": self.optimised_signals(),
                           "refusal_heads": self.heads.count if self.heads is not None else 0})

    def _start_heads(self, model: nn.Module, layers: list[MLPLayer], restored: dict[str, Any] | None) -> RefusalHeadMonitor | None:
        """The refusal-head monitor, when ``refusal_heads > 0`` and the atlas holds heads; its reference
        comes from the checkpoint's state if there is one there, else it is taken now."""
        assert self.atlas is not None
        if not self.config.atlas.refusal_heads:
            return None
        if not self.atlas.num_heads:
            why = ("no head was eligible when it was identified" if self.atlas.heads is not None else
                   "it was identified without them; identify it again with refusal_heads > 0")
            logger.warning("rimguard: refusal_heads=%d, but the atlas holds no refusal heads (%s): the heads are not monitored",
                           self.config.atlas.refusal_heads, why)
            return None
        heads = RefusalHeadMonitor(model, layers, self.tokenizer, self.atlas, self.config)
        saved = restored["heads"] if restored is not None and restored["heads"] else None
        if saved is not None and saved["ref_mass"].numel() != heads.count:
            raise GuardStateError(f"the checkpoint's guard state holds references of {saved['ref_mass'].numel()} refusal heads; "
                                  f"this configuration monitors {heads.count} (refusal_heads changed): resume with the "
                                  "refusal_heads it was trained with")
        if restored is not None and saved is None:
            logger.warning("rimguard: the checkpoint's guard state has no refusal-head reference (saved without "
                           "refusal_heads); it is taken now, so refusal_head_shift measures drift since this resume")
        heads.start(saved)
        return heads

    def _save_atlas(self, output_dir: Path) -> None:
        """Save to ``output_dir/rimguard_atlas``; an existing, different atlas there is never overwritten
        (the new one goes to ``rimguard_atlas-2``, ``-3``, ...)."""
        assert self.atlas is not None
        folder, n = output_dir / ATLAS_DIR, 1
        while (folder / "atlas.json").is_file():
            try:
                if NeuronAtlas.load(folder).same_selection(self.atlas):
                    return
            except AtlasError:
                pass
            n += 1
            folder = output_dir / f"{ATLAS_DIR}-{n}"
        self.atlas.save(folder)
        if n > 1:
            logger.warning("rimguard: %s holds a different atlas; this run's atlas is saved to %s", output_dir / ATLAS_DIR, folder)

    def optimised_signals(self) -> list[str]:
        """The logged signals that this configuration's actions optimise directly (not witnesses)."""
        acts = {a for lvl in LEVELS for a in self.config.policy.actions_for(lvl)}
        reg = self.config.actions.regularizer + ("+neurons" if self.config.actions.regularizer == "anchor" and self.config.actions.anchor_act_weight > 0 else "")
        used = ([reg] if "regularize" in acts else []) + (["freeze"] if acts & {"freeze", "freeze_top"} else [])
        return sorted({m for a in used for m in OPTIMISED_SIGNALS[a]})

    def _build_regularizer(self, model: nn.Module, restored: dict[str, Any] | None) -> None:
        """The safety anchor or the parameter anchor, when the configuration can regularize with it."""
        cfg, monitor = self.config, self.monitor
        assert monitor is not None and self.atlas is not None and self.freezer is not None
        if not cfg.policy.regularizes() or cfg.actions.regularizer == "activation":
            return
        safety = [i.to(monitor.device) for i in self.atlas.safety_per_layer()]
        per_source = [ids for ids, _ in monitor.capture.split(safety)]
        if cfg.actions.regularizer == "params":
            if cfg.actions.param_scope == "all":
                slices = [(p, ()) for p in model.parameters() if p.requires_grad]
            else:
                slices = [(p, at) for layer, ids in zip(monitor.layers, safety) if ids.numel()
                          for p, at, _, _ in self.freezer.targets(layer, ids)]
            self.param_anchor = ParamAnchor(slices)
            if restored is not None:
                self.param_anchor.load_state(restored["param"])
            return
        if restored is not None:
            record = restored["anchor"]
            if record is None:
                raise AnchorError("the checkpoint's guard state has no anchor record (it was saved without the safety "
                                  "anchor); resume with the configuration it was trained with")
        else:
            harmful = load_prompts(self.sources["anchor"], self.prompt_key, "anchor")
            harmless = load_prompts(self.sources["anchor_harmless"], self.prompt_key, "anchor_harmless") if cfg.actions.anchor_harmless else []
            probes = set(monitor.probe_prompts())
            overlap = [p for p in harmful + harmless if p in probes]
            if overlap:
                raise AnchorError(f"{len(overlap)} anchor prompt(s) are also monitor probes (e.g. {overlap[0]!r}); the "
                                  "monitor must measure prompts the anchor never trains on: pass disjoint anchor_prompts=")
            record = None
            if dist.is_main():
                record = record_anchor(model, self.tokenizer, monitor.capture, per_source, harmful, harmless, cfg.actions.anchor_max_new_tokens,
                                       cfg.atlas.max_length, cfg.actions.anchor_top_k, cfg.monitor.probe_batch_size)
            record = dist.broadcast(record)
        self.anchor = SafetyAnchor(record.to(monitor.device), per_source, cfg.actions.anchor_batch_size, cfg.actions.anchor_every,
                                   cfg.actions.anchor_act_weight, cfg.monitor.rel_floor)

    def teardown(self) -> None:
        """Remove every hook; the model is left as it is."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.freezer is not None:
            self.freezer.remove()
        self.events.close()

    def finish(self, step: int) -> None:
        """End the run at optimizer step ``step``: a last check if the schedule skipped it, an ``end`` event,
        and :meth:`teardown`. The guard cannot guard another run after this."""
        if self.monitor is not None and self.history and self.history[-1]["step"] != step:
            self.check(step)
        self.events.write({"event": "end", "step": step, "level": self.level})
        self.teardown()
        self._ended = step

    def _identify(self, model: nn.Module, capture: ActivationCapture | None = None) -> NeuronAtlas:
        cfg, key = self.config, self.prompt_key
        harmful = load_prompts(self.sources["harmful"], key, "safety")[: cfg.atlas.num_safety_probes]
        intents = load_prompts(self.sources["intent"], key, "intent") if cfg.atlas.method == "counterfactual" else []
        need_harmless = cfg.atlas.method == "effect_size" or cfg.atlas.refusal_heads > 0
        harmless = load_prompts(self.sources["harmless"], key, "harmless") if need_harmless else []
        spans = load_prompts(self.sources["spans"], key, "reasoning_spans") if cfg.atlas.refusal_heads else []
        logger.info("rimguard: identifying safety-critical neurons on %d prompts", len(harmful))
        dtype = next(model.parameters()).dtype
        if dtype in (torch.bfloat16, torch.float16):
            logger.warning("rimguard: identifying the safety neurons under %s; the selection can differ from an fp32 one. "
                           "Identify once in fp32 (rimguard identify MODEL_DIR -o atlas/) and pass atlas='atlas/' to reuse it.",
                           str(dtype).replace("torch.", ""))
        return NeuronAtlas.identify(model, self.tokenizer, harmful, intents, harmless, capture=capture, reasoning_spans=spans,
                                    **cfg.identify_options())

    def _set_penalty_reference(self) -> None:
        monitor, term = self.monitor, self.penalty_term
        if monitor is None or term is None or term.reference is not None or monitor.ref_task is None:
            return
        tracked = self.atlas.tracked.to(monitor.ref_task.device)
        safety = tracked[self.atlas.safety.to(tracked.device)]
        values = monitor.ref_task[self.atlas.safety.to(tracked.device)]
        per_layer = [values[safety[:, 0] == layer] for layer in range(len(monitor.layers))]
        split = monitor.capture.split([safety[safety[:, 0] == layer, 1] for layer in range(len(monitor.layers))])
        term.set_reference([per_layer[src.layer][pos] for src, (_, pos) in zip(monitor.capture.sources, split)])

    def _add_penalty(self, module: nn.Module, output: Any) -> Any:
        """Output tap on the last decoder block: tie the penalty to its output hidden states."""
        term, monitor = self.penalty_term, self.monitor
        if not module.training or not torch.is_grad_enabled() or (monitor is not None and monitor.capture.routing):
            return output
        penalty = term.pop() if term is not None and term.active else None
        if penalty is None and self._pending is None:  # most forwards: nothing to tie, no work
            return output
        accum, scale = self.backward_scale()
        # the activation penalty is per micro-batch (mean over them); the anchor loss once per optimizer step
        parts = [t for t in (penalty / accum if penalty is not None else None, self._pending) if t is not None]
        self._pending = None
        hidden = output[0] if isinstance(output, tuple) else output
        tied = attach_penalty(hidden, torch.stack(parts).sum(), torch.as_tensor(scale, device=hidden.device))
        return (tied, *output[1:]) if isinstance(output, tuple) else tied

    # -- actions: the plan of a level, executed --------------------------------------------------
    def _execute(self, plan: Plan, step: int, report: Report | None = None) -> None:
        """Apply ``plan``: lambda follows 'regularize' (in force or not); every other action runs its executor."""
        weight = self.config.actions.weight if "regularize" in plan.actions else 0.0
        self._set_weight(weight * (PENALTY_FACTOR[plan.level] if self.config.actions.adaptive_penalty else 1.0))
        for action in plan.actions:
            EXECUTORS.get(action, _nothing)(self, plan, step, report)

    def _set_weight(self, weight: float) -> None:
        self.weight = weight
        if self.penalty_term is not None:
            self.penalty_term.weight = weight if self.config.actions.regularizer == "activation" else 0.0

    def _freeze(self, per_layer: Sequence[torch.Tensor], step: int, which: str) -> None:
        assert self.freezer is not None
        added = self.freezer.freeze(per_layer)
        if added:
            self.events.write({"event": "freeze", "step": step, "which": which, "added": added, "frozen": self.freezer.count})
            if dist.is_main():
                logger.warning("rimguard: froze %d safety neurons at step %d (%d frozen in all)", added, step, self.freezer.count)

    # -- the check -----------------------------------------------------------------------------
    def check(self, step: int) -> Report:
        """Measure, log and let the policy act. Returns the :class:`Report` (its values are also in
        :attr:`history` and the event log)."""
        assert self.monitor is not None and self.penalty_term is not None and self.freezer is not None
        self._set_penalty_reference()
        values = self.monitor.measure()
        if not values:
            return Report(step, values)
        if self.heads is not None:
            values.update(self.heads.measure())
        penalty = self.penalty_term.drain_logged()
        if penalty is not None:
            values["penalty"] = penalty
        for reg in (self.anchor, self.param_anchor):
            if reg is not None:
                values.update(reg.drain_logged())
        decision = self.policy.update(values, may_fall=self._witness_recovered(values))
        report = Report(step, values, decision)
        self._report_faults(decision.faults, step)
        if LEVELS.index(decision.level) > LEVELS.index(decision.previous):
            self.witness = values.get(WITNESS)
        warn = "warn" in self.config.policy.actions_for(decision.level)
        crossed = {(c.level, c.metric) for c in decision.crossings}
        if warn and dist.is_main():  # once per crossing: not again while the metric stays over
            for c in decision.crossings:
                if (c.level, c.metric) not in self._crossed:
                    logger.warning("rimguard: %s=%.4g crossed the '%s' threshold %.4g at step %d", c.metric, c.value, c.level, c.threshold, step)
        self._crossed = crossed
        if decision.changed:
            self.events.write({"event": "level", "step": step, "from": decision.previous, "to": decision.level,
                               "crossings": [c.__dict__ for c in decision.crossings]})
            if dist.is_main():
                logger.warning("rimguard: risk level %s -> %s at step %d", decision.previous, decision.level, step)
            self._execute(Plan.of(self.config, decision.level, decision.previous), step, report)
            if self.on_alert is not None:
                self.on_alert(decision, dict(values), step)
        values.update({"level": float(LEVELS.index(self.policy.level)), "lambda": self.lambda_, "frozen": float(self.freezer.count)})
        record = {"event": "metrics", "step": step, **values, "action": self.action}
        self.history.append(record)
        self.events.write(record)
        return report

    def _witness_recovered(self, values: dict[str, float]) -> bool:
        """Whether the level may fall: with no action in force, always; under an action, only once the
        behavioural witness (the refusal-margin drop, measured on prompts no action trains on) is no
        worse than when the level was raised. An action that optimises what the thresholds read
        (the activation penalty drives z down) cannot talk the guard back to 'ok' while safety is gone."""
        acting = self.weight > 0 or (self.freezer is not None and self.freezer.count > 0)
        now = values.get(WITNESS)
        return not acting or now is None or self.witness is None or now <= self.witness

    def _report_faults(self, faults: list[str], step: int) -> None:
        """A ``fault`` event at every check with non-finite metrics; one warning while the same fault lasts."""
        if faults:
            layers = self.monitor.nonfinite_layers() if self.monitor is not None else []
            self.events.write({"event": "fault", "step": step, "metrics": faults, "layers": layers, "level": self.policy.level})
            if dist.is_main() and not self._faults:  # a new fault episode
                logger.warning("rimguard: non-finite %s at step %d (activations of layer(s) %s); read as a fault, the level "
                               "is held at '%s' or above", ", ".join(faults), step, layers or "-", self.policy.level)
        self._faults = set(faults)

    # -- checkpoint state --------------------------------------------------------------------
    def save_state(self, folder: str | Path) -> None:
        """Write everything needed to resume into ``folder``."""
        assert self.monitor is not None and self.freezer is not None and self.atlas is not None
        folder = Path(folder)
        self.atlas.save(folder / "atlas")
        mon = self.monitor.state_dict()
        frz = self.freezer.state_dict()
        tensors = {f"monitor.{k}": v for k, v in mon["tensors"].items()}
        tensors.update({f"merged.{k}": v for k, v in frz["merged_base"].items()})
        if self.anchor is not None:
            tensors.update({f"anchor.{k}": v for k, v in self.anchor.record.tensors().items()})
        if self.param_anchor is not None:
            tensors.update({f"param.{k}": v for k, v in self.param_anchor.state_dict().items()})
        if self.heads is not None:
            tensors.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"))
        meta = {
            "tensors_sha256": file_sha256(folder / "state.safetensors"), "run_id": self.run_id, "witness": self.witness,
            "ref_margin": mon["ref_margin"], "ref_router": mon["ref_router"], "frozen": frz["frozen"], "lambda": self.lambda_,
            "policy": {"level": self.policy.level, "streak": self.policy.streak},
            "history": self.history, "checkpointed": self.checkpointed,
            "anchor_prompts": self.anchor.record.prompts if self.anchor is not None else None,
        }
        (folder / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    def restore(self, output_dir: str | Path, step: int) -> dict[str, Any] | None:
        """The guard state saved with the checkpoint of ``step`` under ``output_dir``, to pass to :meth:`setup`.

        A checkpoint without guard state follows ``on_missing_state`` (never a silent re-identification):
        an error naming the remedies, the saved atlas with references re-taken now (None is returned),
        or a fresh identification (None)."""
        output_dir = Path(output_dir)
        folder = output_dir / f"checkpoint-{step}" / STATE_DIR
        if (folder / "state.json").is_file():
            restored = read_state(folder)
            restored["step"] = step
            return restored
        policy, saved = self.config.monitor.on_missing_state, output_dir / ATLAS_DIR
        if policy == "error":
            raise GuardStateError(
                f"resuming at step {step}, but {folder} holds no guard state. Either resume from a checkpoint saved with "
                f"the guard attached, or set GuardConfig(on_missing_state='atlas') to reuse the saved atlas {saved} with "
                "references re-taken now (the metrics then measure drift since this resume), or on_missing_state='fresh' "
                "to identify anew on the current weights"
            )
        self._rebased = True
        if policy == "atlas" and self.atlas is None:
            self.atlas = NeuronAtlas.load(saved)
        logger.warning("rimguard: resuming at step %d without guard state (%s); on_missing_state=%r: %s", step, folder, policy,
                       f"reusing {saved}, references re-taken now" if policy == "atlas" else "identifying anew")
        return None


# -- executors: one per action; the mapping level -> actions is GuardConfig.actions_for ------------
def _nothing(engine: GuardEngine, plan: Plan, step: int, report: Report | None) -> None:
    """'warn' and 'regularize' need no executor: warnings are logged by the check, lambda by _execute."""


def _freeze_set(engine: GuardEngine, plan: Plan, step: int, report: Report | None) -> None:
    """Freeze the atlas' safety neurons, or the ``freeze_share`` of all neurons ranked by the atlas."""
    share = engine.config.actions.freeze_share
    per_layer = engine.atlas.top_share_per_layer(share) if share else engine.atlas.safety_per_layer()
    engine._freeze(per_layer, step, f"share {share:g}" if share else "all")


def _freeze_top(engine: GuardEngine, plan: Plan, step: int, report: Report | None) -> None:
    """Freeze the most shifted ``freeze_top_fraction`` of the safety neurons (unless 'freeze' takes them all)."""
    if "freeze" in plan.actions or not engine.monitor.ready():
        return
    chosen = top_fraction(engine.monitor.shift_per_neuron().cpu(), engine.config.actions.freeze_top_fraction)
    neurons = engine.atlas.safety_neurons()
    engine._freeze([neurons[chosen & (neurons[:, 0] == layer), 1] for layer in range(len(engine.atlas.layer_sizes))], step, "top")


def _checkpoint(engine: GuardEngine, plan: Plan, step: int, report: Report | None) -> None:
    """Ask the loop for one checkpoint (the first time the level reaches a checkpointing level)."""
    if report is not None and not engine.checkpointed:
        report.save = engine.checkpointed = True


def _stop(engine: GuardEngine, plan: Plan, step: int, report: Report | None) -> None:
    if report is not None:
        report.stop = True
        engine.events.write({"event": "stop", "step": step, "level": plan.level})


EXECUTORS: dict[str, Callable[[GuardEngine, Plan, int, Report | None], None]] = {
    "warn": _nothing, "regularize": _nothing, "freeze": _freeze_set, "freeze_top": _freeze_top,
    "checkpoint": _checkpoint, "stop": _stop,
}


def read_state(folder: str | Path) -> dict[str, Any]:
    """Read a guard checkpoint state folder, checking every field; any defect is a :class:`GuardStateError`
    (or the atlas' :class:`AtlasError`) naming the file and the field."""
    r, name = Reader(folder, GuardStateError), "state.json"
    meta = r.json(name)
    tensors = r.tensors("state.safetensors", meta.get("tensors_sha256"))
    atlas = NeuronAtlas.load(r.folder / "atlas")
    policy = r.field(meta, "policy", dict, name)
    if policy.get("level") not in LEVELS or not isinstance(policy.get("streak"), int):
        r.fail(r.folder / name, f"field 'policy' must hold a level in {LEVELS} and an integer streak, found {policy}")
    frozen = r.field(meta, "frozen", list, name)
    sizes = atlas.layer_sizes
    if len(frozen) != len(sizes) or not all(isinstance(ids, list) and all(isinstance(i, int) and 0 <= i < n for i in ids)
                                            for ids, n in zip(frozen, sizes)):
        r.fail(r.folder / name, f"field 'frozen' must hold one list of neuron ids per layer ({len(sizes)} layers) within the "
                                "layer sizes of the atlas")
    weight = r.field(meta, "lambda", (int, float), name)
    if weight < 0:
        r.fail(r.folder / name, f"field 'lambda' must be >= 0, found {weight}")
    history = r.field(meta, "history", list, name)
    if not all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
        r.fail(r.folder / name, "field 'history' must be a list of records with an integer 'step'")

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

    heads = part("heads")
    if heads:
        ref = r.tensor(tensors, "heads.ref_mass", "state.safetensors", True, (None,))
        r.values(ref, "heads.ref_mass", "state.safetensors", 0.0, 1.0)
        if ref.numel() > atlas.num_heads:
            r.fail(r.folder / "state.safetensors", f"tensor 'heads.ref_mass' has {ref.numel()} entries for the atlas' "
                                                   f"{atlas.num_heads} refusal heads")
    anchor = part("anchor")
    prompts = r.strings(meta, "anchor_prompts", name, optional=True)
    if anchor and prompts is None:
        r.fail(r.folder / name, "field 'anchor_prompts' is missing, but state.safetensors holds an anchor record")
    return {
        "run_id": r.field(meta, "run_id", str, name, optional=True) or "",
        "witness": r.field(meta, "witness", (int, float), name, optional=True),
        "anchor": AnchorRecord.from_tensors(anchor, prompts) if anchor else None,
        "param": part("param"),
        "heads": heads,
        "atlas": atlas,
        "monitor": {"tensors": part("monitor"), "ref_margin": r.field(meta, "ref_margin", (int, float), name, optional=True),
                    "ref_router": r.field(meta, "ref_router", (int, float), name, optional=True)},
        "freezer": {"frozen": frozen, "merged_base": part("merged")},
        "policy": policy, "history": history, "checkpointed": r.field(meta, "checkpointed", bool, name), "lambda": float(weight),
    }
