"""``RIMGuard``: the ``TrainerCallback`` that wires atlas, monitor, policy and actions together.

Add it to any ``transformers.Trainer`` (TRL's ``SFTTrainer`` and other subclasses included)::

    guard = RIMGuard(GuardConfig(mode="monitor", probe_every=10))
    trainer = SFTTrainer(..., callbacks=[guard])

At train begin it loads or identifies the neuron atlas, hooks the MLPs and takes base
references; every ``probe_every`` steps (and at steps 1, 2, 4, ... before that, because
forgetting starts early) it measures, logs through the Trainer's own ``log`` (so ``report_to``
carries ``rimguard/*`` scalars to TensorBoard or wandb) and to ``output_dir/rimguard.jsonl``, and
lets the policy act. For custom training loops, see :meth:`RIMGuard.penalty` and
:meth:`RIMGuard.after_optimizer_step`.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rimguard import dist
from rimguard.anchor import AnchorError, AnchorRecord, ParamAnchor, SafetyAnchor, record_anchor
from rimguard.atlas import AtlasError, NeuronAtlas
from rimguard.config import LEVELS, GuardConfig
from rimguard.events import EventLog, new_run_id
from rimguard.interventions import EntanglementPenalty, NeuronFreezer, attach_penalty, trainer_penalty_scale
from rimguard.monitor import EntanglementMonitor
from rimguard.policy import Decision, RiskPolicy
from rimguard.probes import bundled, load_prompts
from rimguard.schema import Reader, file_sha256

logger = logging.getLogger("rimguard")

STATE_DIR = "rimguard"
ATLAS_DIR = "rimguard_atlas"
WITNESS = "refusal_drop"  # behavioural, on the monitor's own probes: no action optimises it
PENALTY_FACTOR = {"ok": 1.0, "warn": 1.0, "regularize": 1.0, "freeze": 2.0, "stop": 4.0}
ONE_OFF_ACTIONS = ("checkpoint", "freeze_top", "freeze")  # still taken when a rise jumps over their level
AlertHandler = Callable[[Decision, dict, int], None]


def _find_trainer() -> Any:
    """The ``transformers.Trainer`` whose method is on the call stack, if any."""
    from transformers import Trainer

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def _tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


class GuardStateError(RuntimeError):
    """The guard's checkpoint state is missing or unusable; the message names the path and the remedies."""


class RIMGuard(TrainerCallback):
    """Online guard against reasoning-induced misalignment.

    Args:
        config: a :class:`GuardConfig`, a dict of its fields, or a YAML/JSON path.
        atlas: a :class:`NeuronAtlas` or its folder; identified at train begin if None.
        tokenizer: defaults to the Trainer's ``processing_class``.
        safety_prompts, intent_prompts, harmless_prompts: probe sources for identification
            (anything :func:`rimguard.probes.load_prompts` takes); bundled sets by default.
        reasoning_prompts: reasoning probes for the base reference and KL; by default the
            training data itself is used.
        anchor_prompts, anchor_harmless_prompts: the safety anchor's harmful prompts and harmless
            look-alikes (bundled sets by default); they must not overlap the monitor's probes.
        prompt_key: the column/field holding the text in CSV/JSONL/dataset prompt sources (default:
            the first of ``prompt``, ``goal``, ``text``, ``question``, ``instruction``, ``request``).
        on_alert: called as ``on_alert(decision, metrics, step)`` whenever the level changes.
        trainer: the Trainer, if it cannot be found on the call stack.
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
        prompt_key: str | None = None,
        on_alert: AlertHandler | None = None,
        trainer: Any = None,
        **overrides: Any,
    ) -> None:
        if isinstance(config, (str, Path)):
            config = GuardConfig.load(config)
        elif isinstance(config, dict):
            config = GuardConfig.from_dict(config)
        config = config or GuardConfig()
        self.config = GuardConfig.from_dict({**config.to_dict(), **overrides}) if overrides else config
        self.atlas = NeuronAtlas.load(atlas) if isinstance(atlas, (str, Path)) else atlas
        self.tokenizer = tokenizer
        self.sources = {
            "harmful": safety_prompts if safety_prompts is not None else "bundled:harmful",
            "intent": intent_prompts if intent_prompts is not None else "bundled:intent",
            "harmless": harmless_prompts if harmless_prompts is not None else "bundled:harmless",
            "anchor": anchor_prompts if anchor_prompts is not None else "bundled:anchor_harmful",
            "anchor_harmless": anchor_harmless_prompts if anchor_harmless_prompts is not None else "bundled:anchor_harmless",
        }
        self.prompt_key = prompt_key
        self.reasoning = load_prompts(reasoning_prompts, prompt_key, "reasoning") if reasoning_prompts is not None else []
        self.on_alert = on_alert
        self.trainer = trainer
        self.policy = RiskPolicy(self.config.thresholds, self.config.hysteresis, self.config.patience, self.config.fault_level)
        self.monitor: EntanglementMonitor | None = None
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
        self._loss_handle: torch.utils.hooks.RemovableHandle | None = None
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
            parts.append(f"regularize ({self.config.regularizer}, lambda={self.weight:g})")
        if self.freezer is not None and self.freezer.count:
            parts.append(f"freeze ({self.freezer.count} neurons)")
        return ", ".join(parts) or "none (monitor only)"

    def begin_step(self, step: int) -> None:
        """Compute this optimizer step's anchor loss (a forward with gradient on the anchor batch).

        ``step`` counts the optimizer steps done before this one. The Trainer integration calls it
        from ``on_step_begin``; custom loops call it before the step's first forward.
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
        """Hold frozen neurons fixed; call after every ``optimizer.step()`` in a custom loop."""
        if self.freezer is not None:
            self.freezer.restore()

    def attached(self) -> bool:
        return self._loss_handle is not None or (self.monitor is not None and self.monitor.attached)

    # -- set-up ------------------------------------------------------------------------------
    def setup(
        self, model: nn.Module, tokenizer: Any = None, output_dir: str | Path | None = None, inject_loss: bool = True,
        restored: dict[str, Any] | None = None,
    ) -> None:
        """Build or check the atlas, take base references and attach hooks.

        Called by ``on_train_begin``; call it yourself in a custom training loop.
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
            self.events = EventLog(Path(output_dir) / cfg.log_file if cfg.log_file else None, self.run_id)
            if restored is not None:  # each step once: this run's records after the checkpoint are replaced
                self.events.drop_after(restored["step"])
        if restored is not None:
            self.atlas = restored["atlas"]
        if self.atlas is None:
            self.atlas = dist.broadcast(self._identify(model) if dist.is_main() else None)
            if dist.is_main() and output_dir is not None:
                self._save_atlas(Path(output_dir))
        else:
            self.atlas.check_model(model, check_weights=restored is None and not self._rebased)
        monitor = EntanglementMonitor(
            model, self.tokenizer, self.atlas, cfg, self.reasoning,
            bundled("refusal_openings"), bundled("compliance_openings"),
        )
        self.monitor = monitor
        monitor.start(restored["monitor"] if restored else None)
        self.penalty_term = EntanglementPenalty([i.to(monitor.device) for i in self.atlas.safety_per_layer()])
        monitor.capture.taps.append(self.penalty_term)
        self._set_penalty_reference()
        self.freezer = NeuronFreezer(monitor.layers)
        self._build_regularizer(model, restored)
        if inject_loss:
            self._loss_handle = monitor.layers[-1].block.register_forward_hook(self._add_penalty)
        if restored is not None:
            self.freezer.load_state(restored["freezer"], model)
            self.policy.level, self.policy.streak = restored["policy"]["level"], restored["policy"]["streak"]
            self.history = restored["history"]
            self.checkpointed = restored["checkpointed"]
            self._set_weight(restored["lambda"])
            self.witness = restored["witness"]
        else:
            self._apply(self.policy.level, step=0, control=None)
        self.events.write({"event": "start", "step": 0, "atlas": self.atlas.settings, "num_safety": self.atlas.num_safety,
                           "mode": cfg.mode, "thresholds": cfg.thresholds, "resumed": restored is not None,
                           "regularizer": cfg.regularizer if cfg.regularizes() else None,
                           "optimised_signals": self.optimised_signals()})

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
        from rimguard.config import OPTIMISED_SIGNALS

        acts = {a for lvl in LEVELS for a in self.config.actions_for(lvl)}
        reg = self.config.regularizer + ("+neurons" if self.config.regularizer == "anchor" and self.config.anchor_act_weight > 0 else "")
        used = ([reg] if "regularize" in acts else []) + (["freeze"] if acts & {"freeze", "freeze_top"} else [])
        return sorted({m for a in used for m in OPTIMISED_SIGNALS[a]})

    def _build_regularizer(self, model: nn.Module, restored: dict[str, Any] | None) -> None:
        """The safety anchor or the parameter anchor, when the configuration can regularize with it."""
        cfg, monitor = self.config, self.monitor
        assert monitor is not None and self.atlas is not None and self.freezer is not None
        if not cfg.regularizes() or cfg.regularizer == "activation":
            return
        safety = [i.to(monitor.device) for i in self.atlas.safety_per_layer()]
        if cfg.regularizer == "params":
            if cfg.param_scope == "all":
                slices = [(p, 0, None) for p in model.parameters() if p.requires_grad]
            else:
                slices = [(p, d, i) for layer, ids in zip(monitor.layers, safety) if ids.numel()
                          for p, d, i, _, _ in self.freezer.targets(layer, ids)]
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
            harmless = load_prompts(self.sources["anchor_harmless"], self.prompt_key, "anchor_harmless") if cfg.anchor_harmless else []
            probes = set(monitor.probe_prompts())
            overlap = [p for p in harmful + harmless if p in probes]
            if overlap:
                raise AnchorError(f"{len(overlap)} anchor prompt(s) are also monitor probes (e.g. {overlap[0]!r}); the "
                                  "monitor must measure prompts the anchor never trains on: pass disjoint anchor_prompts=")
            record = None
            if dist.is_main():
                record = record_anchor(model, self.tokenizer, monitor.capture, safety, harmful, harmless, cfg.anchor_max_new_tokens,
                                       cfg.max_length, cfg.anchor_top_k, cfg.probe_batch_size)
            record = dist.broadcast(record)
        self.anchor = SafetyAnchor(record.to(monitor.device), safety, cfg.anchor_batch_size, cfg.anchor_every,
                                   cfg.anchor_act_weight, cfg.rel_floor)

    def teardown(self) -> None:
        """Remove every hook; the model is left as it is."""
        if self.monitor is not None:
            self.monitor.stop()
        if self.freezer is not None:
            self.freezer.remove()
        if self._loss_handle is not None:
            self._loss_handle.remove()
            self._loss_handle = None
        self.events.close()

    def _identify(self, model: nn.Module) -> NeuronAtlas:
        cfg = self.config
        key = self.prompt_key
        harmful = load_prompts(self.sources["harmful"], key, "safety")[: cfg.num_safety_probes]
        intents = load_prompts(self.sources["intent"], key, "intent") if cfg.method == "counterfactual" else []
        harmless = load_prompts(self.sources["harmless"], key, "harmless") if cfg.method == "effect_size" else []
        logger.info("rimguard: identifying safety-critical neurons on %d prompts", len(harmful))
        dtype = next(model.parameters()).dtype
        if dtype in (torch.bfloat16, torch.float16):
            logger.warning("rimguard: identifying the safety neurons under %s; the selection can differ from an fp32 one. "
                           "Identify once in fp32 (rimguard identify MODEL_DIR -o atlas/) and pass atlas='atlas/' to reuse it.",
                           str(dtype).replace("torch.", ""))
        return NeuronAtlas.identify(
            model, self.tokenizer, harmful, intents, harmless, self.reasoning, method=cfg.method, top_m=cfg.top_m,
            min_share=cfg.min_share, num_controls=cfg.num_controls, max_new_tokens=cfg.max_new_tokens,
            max_length=cfg.max_length, batch_size=cfg.probe_batch_size, seed=cfg.seed,
        )

    def _set_penalty_reference(self) -> None:
        monitor, term = self.monitor, self.penalty_term
        if monitor is None or term is None or term.reference is not None or monitor.ref_task is None:
            return
        tracked = self.atlas.tracked.to(monitor.ref_task.device)
        safety = tracked[self.atlas.safety.to(tracked.device)]
        values = monitor.ref_task[self.atlas.safety.to(tracked.device)]
        term.set_reference([values[safety[:, 0] == layer] for layer in range(len(monitor.layers))])

    def _add_penalty(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook on the last decoder block: tie the penalty to its output hidden states."""
        term, monitor = self.penalty_term, self.monitor
        if not module.training or not torch.is_grad_enabled() or (monitor is not None and monitor.capture.routing):
            return output
        accum, scale = trainer_penalty_scale(self.trainer)
        # the activation penalty is per micro-batch (mean over them); the anchor loss once per optimizer step
        parts = [t / accum for t in (term.pop() if term is not None and term.active else None,) if t is not None]
        if self._pending is not None:
            parts.append(self._pending)
            self._pending = None
        if not parts:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        tied = attach_penalty(hidden, torch.stack(parts).sum(), torch.as_tensor(scale, device=hidden.device))
        return (tied, *output[1:]) if isinstance(output, tuple) else tied

    # -- actions -----------------------------------------------------------------------------
    def _actions(self, level: str, previous: str) -> list[str]:
        """``level``'s actions, plus the one-off actions (checkpoint, freezes) of the levels that a
        rise from ``previous`` jumped over: a jump from ok to freeze still saves the warn checkpoint."""
        jumped = LEVELS[LEVELS.index(previous) + 1 : LEVELS.index(level)]
        one_off = [a for lvl in jumped for a in self.config.actions_for(lvl) if a in ONE_OFF_ACTIONS]
        return list(dict.fromkeys(one_off + self.config.actions_for(level)))

    def _apply(self, level: str, step: int, control: TrainerControl | None, previous: str | None = None) -> None:
        actions = self._actions(level, previous if previous is not None else level)
        assert self.penalty_term is not None and self.freezer is not None and self.monitor is not None
        weight = self.config.weight if "regularize" in actions else 0.0
        if self.config.adaptive_penalty:
            weight *= PENALTY_FACTOR[level]
        self._set_weight(weight)
        safety = self.atlas.safety_per_layer()
        if "freeze" in actions:
            share = self.config.freeze_share
            self._freeze(self.atlas.top_share_per_layer(share) if share else safety, step, f"share {share:g}" if share else "all")
        if "freeze_top" in actions and "freeze" not in actions and self.monitor.ready():
            shift = self.monitor.shift_per_neuron().cpu()
            keep = max(1, int(round(self.config.freeze_top_fraction * shift.numel())))
            chosen = torch.zeros(shift.numel(), dtype=torch.bool)
            chosen[shift.topk(keep).indices] = True
            neurons = self.atlas.safety_neurons()
            self._freeze([neurons[chosen & (neurons[:, 0] == layer), 1] for layer in range(len(safety))], step, "top")
        if control is not None and "checkpoint" in actions and not self.checkpointed:
            control.should_save = True
            self.checkpointed = True
        if control is not None and "stop" in actions:
            control.should_training_stop = True
            self.events.write({"event": "stop", "step": step, "level": level})

    def _set_weight(self, weight: float) -> None:
        self.weight = weight
        if self.penalty_term is not None:
            self.penalty_term.weight = weight if self.config.regularizer == "activation" else 0.0

    def _freeze(self, per_layer: Sequence[torch.Tensor], step: int, which: str) -> None:
        assert self.freezer is not None
        added = self.freezer.freeze(per_layer)
        if added:
            self.events.write({"event": "freeze", "step": step, "which": which, "added": added, "frozen": self.freezer.count})
            if dist.is_main():
                logger.warning("rimguard: froze %d safety neurons at step %d (%d frozen in all)", added, step, self.freezer.count)

    def check(self, step: int, control: TrainerControl | None = None) -> dict[str, float]:
        """Measure, log and let the policy act. Returns the metrics."""
        assert self.monitor is not None and self.penalty_term is not None and self.freezer is not None
        self._set_penalty_reference()
        values = self.monitor.measure()
        if not values:
            return values
        penalty = self.penalty_term.drain_logged()
        if penalty is not None:
            values["penalty"] = penalty
        for reg in (self.anchor, self.param_anchor):
            if reg is not None:
                values.update(reg.drain_logged())
        decision = self.policy.update(values, may_fall=self._witness_recovered(values))
        self._report_faults(decision.faults, step)
        if LEVELS.index(decision.level) > LEVELS.index(decision.previous):
            self.witness = values.get(WITNESS)
        warn = "warn" in self.config.actions_for(decision.level)
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
            self._apply(decision.level, step, control, decision.previous)
            if self.on_alert is not None:
                self.on_alert(decision, dict(values), step)
        values.update({"level": float(LEVELS.index(self.policy.level)), "lambda": self.lambda_, "frozen": float(self.freezer.count)})
        record = {"event": "metrics", "step": step, **values, "action": self.action}
        self.history.append(record)
        self.events.write(record)
        if self.trainer is not None:  # Trainer.log resets control.should_log: keep the step's own loss log
            should_log = self.trainer.control.should_log
            self.trainer.log({f"rimguard/{k}": v for k, v in values.items()})
            self.trainer.control.should_log = should_log
        return values

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

    def due(self, step: int) -> bool:
        every = self.config.probe_every
        return step % every == 0 or (step < every and step & (step - 1) == 0)

    # -- TrainerCallback ---------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.trainer = self.trainer or _find_trainer()
        self._check_backend(args)
        restored = self._load_checkpoint(args, state) if state.global_step > 0 else None
        if restored is not None:
            restored["step"] = state.global_step
        self.setup(model, self.tokenizer or _tokenizer_of(kwargs.get("processing_class")), args.output_dir, restored=restored)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.begin_step(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._pending = None  # a step whose forwards never took the anchor loss must not carry it over
        if self.monitor is None:
            return
        self.monitor.step_end()
        if self.due(state.global_step):
            self.check(state.global_step, control)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.after_optimizer_step()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is None or not dist.is_main():
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
        self.save_state(folder)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.monitor is not None and self.history and self.history[-1]["step"] != state.global_step:
            self.check(state.global_step)
        self.events.write({"event": "end", "step": state.global_step, "level": self.level})
        self.teardown()
        self._ended = state.global_step

    # -- distributed back-ends ---------------------------------------------------------------
    def _check_backend(self, args: TrainingArguments) -> None:
        sharded = "deepspeed" if getattr(args, "deepspeed", None) else "fsdp" if getattr(args, "fsdp", None) else None
        freezes = any(a.startswith("freeze") for lvl in LEVELS for a in self.config.actions_for(lvl))
        if sharded and freezes:
            raise RuntimeError(
                f"rimguard: freezing is not supported under {sharded} (parameters are sharded); "
                "use mode='monitor' or 'regularize', or actions without freeze/freeze_top"
            )
        if sharded and self.config.regularizes() and self.config.regularizer != "activation":
            raise RuntimeError(
                f"rimguard: regularizer='{self.config.regularizer}' is not supported under {sharded}: it runs its own "
                "forward on the unwrapped model (anchor) or needs whole parameters (params); use regularizer='activation' "
                "there, or train without sharding"
            )

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
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "state.safetensors"))
        meta = {
            "tensors_sha256": file_sha256(folder / "state.safetensors"), "run_id": self.run_id, "witness": self.witness,
            "ref_margin": mon["ref_margin"], "frozen": frz["frozen"], "lambda": self.lambda_,
            "policy": {"level": self.policy.level, "streak": self.policy.streak},
            "history": self.history, "checkpointed": self.checkpointed,
            "anchor_prompts": self.anchor.record.prompts if self.anchor is not None else None,
        }
        (folder / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    def _load_checkpoint(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any] | None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
        if not (folder / "state.json").is_file():
            return self._missing_state(Path(args.output_dir), folder, state.global_step)
        return read_state(folder)

    def _missing_state(self, output_dir: Path, folder: Path, step: int) -> None:
        """A resume whose checkpoint has no guard state: follow ``on_missing_state`` (never silently re-identify)."""
        policy = self.config.on_missing_state
        saved = output_dir / ATLAS_DIR
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

    anchor = part("anchor")
    prompts = r.strings(meta, "anchor_prompts", name, optional=True)
    if anchor and prompts is None:
        r.fail(r.folder / name, "field 'anchor_prompts' is missing, but state.safetensors holds an anchor record")
    return {
        "run_id": r.field(meta, "run_id", str, name, optional=True) or "",
        "witness": r.field(meta, "witness", (int, float), name, optional=True),
        "anchor": AnchorRecord.from_tensors(anchor, prompts) if anchor else None,
        "param": part("param"),
        "atlas": atlas,
        "monitor": {"tensors": part("monitor"), "ref_margin": r.field(meta, "ref_margin", (int, float), name, optional=True)},
        "freezer": {"frozen": frozen, "merged_base": part("merged")},
        "policy": policy, "history": history, "checkpointed": r.field(meta, "checkpointed", bool, name), "lambda": float(weight),
    }
