"""``GuardEngine``: the guard without any training framework.

It wires the pipeline (hooks -> atlas -> signals -> policy -> actions) and knows nothing of
``transformers.Trainer``; :class:`rimguard.RIMGuard` adapts it to HF/TRL trainers, and a
hand-written loop drives it directly::

    engine = GuardEngine(GuardConfig(mode="regularize"))
    engine.setup(model, tokenizer, output_dir="runs/x", inject_loss=False)
    for step, batch in enumerate(loader):          # ``step``: optimizer steps done before this one
        engine.begin_step(step)                    # the anchor's forward (when due)
        loss = model(**batch).loss
        extra = engine.reg_loss()                  # the regularizer's loss, weighted by lambda
        (loss if extra is None else loss + extra).backward()
        engine.before_optimizer_step()             # KL's base reference, on the first step
        optimizer.step(); optimizer.zero_grad()
        engine.after_optimizer_step()              # holds frozen neurons
        report = engine.end_step(step + 1)         # a check when the schedule says so
        if report is not None and report.stop:
            break
    engine.finish(step + 1)

Each part has its room: :mod:`rimguard.hooks`, :mod:`rimguard.atlas`, :mod:`rimguard.signals`,
:mod:`rimguard.policy`, :mod:`rimguard.actions` and the checkpoint state, :mod:`rimguard.state`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rimguard import dist
from rimguard.actions import BuildContext, Regularizer, check_backend
from rimguard.actions.executors import EXECUTORS
from rimguard.actions.freeze import NeuronFreezer
from rimguard.actions.tie import BackwardScale, LossTie
from rimguard.atlas import NeuronAtlas
from rimguard.config import GuardConfig
from rimguard.events import EventLog, new_run_id, warn_main
from rimguard.hooks.arch import find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.policy import LAMBDA_FACTOR, LEVELS, Decision, GuardPolicy, Plan, Report, optimised_signals
from rimguard.probes import ProbeSources, bundled
from rimguard.signals.heads import RefusalHeadMonitor
from rimguard.signals.monitor import EntanglementMonitor
from rimguard.state import GuardState, GuardStateError, measured_settings, resume_state, save_atlas

logger = logging.getLogger("rimguard")
AlertHandler = Callable[[Decision, dict, int], None]


class GuardEngine:
    """Online guard against reasoning-induced misalignment, for any training loop (see module docstring).

    Args:
        config: a :class:`GuardConfig`, a dict of its fields, or a YAML/JSON path.
        atlas: a :class:`NeuronAtlas` or its folder; identified at :meth:`setup` if None.
        tokenizer: the model's tokenizer (or pass it to :meth:`setup`).
        safety_prompts, intent_prompts, harmless_prompts: probe sources for identification
            (anything :func:`rimguard.probes.load_prompts` takes); bundled sets by default.
        task_prompts: task (reasoning) probes for the base reference and KL; by default the training data itself.
        anchor_prompts, anchor_harmless_prompts: the safety anchor's harmful prompts and harmless
            look-alikes (bundled sets by default); they must not overlap the monitor's probes.
        reasoning_spans: reasoning passages placed before the answer to find the refusal heads (``refusal_heads > 0``; bundled).
        prompt_key: the text's column in CSV/JSONL/dataset prompt sources (default: the first of ``prompt``, ``goal``,
            ``text``, ``question``, ``instruction``, ``request``).
        on_alert: called as ``on_alert(decision, metrics, step)`` whenever the level changes.
        schedule: ``schedule(step) -> bool``, whether to check after optimizer step ``step``;
            default :meth:`MonitorConfig.is_check_step` (every ``probe_every``, and steps 1, 2, 4, ... before).
        **overrides: GuardConfig fields, e.g. ``probe_every=20``.
    """

    def __init__(
        self, config: GuardConfig | dict | str | Path | None = None, *, atlas: NeuronAtlas | str | Path | None = None,
        tokenizer: Any = None, safety_prompts: Any = None, intent_prompts: Any = None, harmless_prompts: Any = None,
        task_prompts: Any = None, anchor_prompts: Any = None, anchor_harmless_prompts: Any = None, reasoning_spans: Any = None,
        prompt_key: str | None = None, on_alert: AlertHandler | None = None, schedule: Callable[[int], bool] | None = None,
        **overrides: Any,
    ) -> None:
        self.config = GuardConfig.of(config, **overrides)
        self.atlas = NeuronAtlas.load(atlas) if isinstance(atlas, (str, Path)) else atlas
        self.tokenizer = tokenizer
        given = {"harmful": safety_prompts, "intent": intent_prompts, "harmless": harmless_prompts, "anchor_harmful": anchor_prompts,
                 "anchor_harmless": anchor_harmless_prompts, "reasoning_spans": reasoning_spans}
        self.sources = ProbeSources(**{k: v for k, v in given.items() if v is not None}, task=task_prompts, key=prompt_key)
        self.on_alert = on_alert
        self.due = schedule or self.config.monitor.is_check_step
        self.backward_scale: BackwardScale = lambda: (1, 1.0)  # of the backward the loss tie joins; an integration sets it
        self.policy = GuardPolicy.of(self.config.policy)
        self.capture: ActivationCapture | None = None
        self.monitor: EntanglementMonitor | None = None
        self.heads: RefusalHeadMonitor | None = None
        self.regularizer: Regularizer | None = None
        self.tie = LossTie(None, self.backward_scale)
        self.freezer: NeuronFreezer | None = None
        self.history: list[dict[str, Any]] = []
        self.events = EventLog(None)
        self.run_id = ""
        self.rebased = False  # resumed without guard state: references are re-taken on trained weights
        self._ended: int | None = None  # the step at which this guard's run ended (a guard guards one run)
        self.owner: str | None = None  # the training state's token (an integration sets it; saved, checked on resume)

    # -- what the guard is doing ----------------------------------------------------------------
    @property
    def level(self) -> str:
        """The risk level: what the signals say."""
        return self.policy.level

    @property
    def action(self) -> str:
        """What the guard is doing now, apart from the risk level."""
        parts = [f"regularize ({self.config.actions.regularizer}, lambda={self.tie.reg_lambda:g})"] if self.tie.reg_lambda > 0 else []
        parts += [f"freeze ({self.freezer.count} neurons)"] if self.freezer is not None and self.freezer.count else []
        return ", ".join(parts) or "none (monitor only)"

    def attached(self) -> bool:
        return self.capture is not None and self.capture.attached

    def optimised_signals(self) -> list[str]:
        """The logged signals that this configuration's actions optimise directly (not witnesses)."""
        return optimised_signals(self.config.policy.actions_for, self.regularizer.optimises if self.regularizer else ())

    # -- the training step ---------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Compute this optimizer step's regularizer step loss; ``step`` counts the optimizer steps done
        before this one. Call it before the step's first forward."""
        self.tie.begin_step(step)
        if self.freezer is not None:
            self.freezer.begin_step()

    def reg_loss(self) -> torch.Tensor | None:
        """For custom loops (``inject_loss=False``): the regularizer's loss since the last call, times lambda; add it."""
        return self.tie.take()

    def before_optimizer_step(self) -> None:
        """After the step's backward, before ``optimizer.step()`` (the first step's KL reference is taken here)."""
        if self.monitor is not None:
            self.monitor.before_update()
        if self.freezer is not None:
            self.freezer.mask_sharded_grads()

    def after_optimizer_step(self) -> None:
        """Hold frozen neurons fixed; call after every ``optimizer.step()``."""
        if self.freezer is not None:
            self.freezer.restore()

    def end_step(self, step: int) -> Report | None:
        """Close optimizer step ``step`` (counted from 1): fold its streamed statistics, and check when
        the schedule says so. Returns the check's :class:`Report`, or None."""
        self.tie.end_step()
        if self.freezer is not None and self.freezer.end_step(step):  # a custom loop skipped after_optimizer_step()
            self.events.write({"event": "fault", "step": step, "metrics": ["freeze_not_held"], "layers": [], "level": self.level})
        if self.monitor is None:
            return None
        self.monitor.step_end()
        return self.check(step) if self.due(step) else None

    # -- set-up and teardown -------------------------------------------------------------------
    def setup(self, model: nn.Module, tokenizer: Any = None, output_dir: str | Path | None = None, inject_loss: bool = True,
              restored: GuardState | None = None, backend: str = "single") -> None:
        """Build or check the atlas, take base references, build the regularizer and attach hooks.

        ``inject_loss``: tie the regularizer's loss into every backward through the model (for trainers
        whose loss the guard cannot touch); custom loops pass False and add :meth:`reg_loss`.
        ``restored``: a checkpoint's :class:`GuardState` to resume from. ``backend``: how the model is
        trained (``"single"``, ``"ddp"``, ``"deepspeed"``); FSDP2 is read off the model's parameters.
        """
        if self._ended is not None:
            raise GuardStateError(f"this RIMGuard already guarded a run (ended at step {self._ended}); it holds that run's "
                                  "references, level and log. Give the next train() a new RIMGuard(...)")
        self.tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if self.tokenizer is None:
            raise ValueError("RIMGuard needs a tokenizer: pass tokenizer= or give the Trainer a processing_class")
        cfg = self.config
        reg_cls = check_backend(cfg, dist.backend_of(model, backend))
        atlas = restored.atlas if restored is not None else self.atlas
        cfg.check_heads(atlas.num_heads if atlas is not None else None)
        if restored is not None:
            restored.check_resume(measured_settings(cfg), self.owner, f"the guard state of step {restored.step}")
        self.run_id = restored.run_id if restored is not None else dist.broadcast(new_run_id())
        if dist.is_main() and output_dir is not None:
            self.events = EventLog.of_run(output_dir, cfg.monitor.log_file, self.run_id, restored.step if restored is not None else None)
        self.atlas = atlas
        layers = find_mlp_layers(model)  # the one walk of the model
        dist.replicate_probes(dist.sharded(model))  # sharded parameters: every rank runs every probe pass
        if self.atlas is not None:
            self.atlas.check_model(model, layers, check_weights=restored is None and not self.rebased)
        self.capture = capture = ActivationCapture(model, layers).attach(exclusive=True)  # the one hook layer; the engine owns it
        part = restored.part if restored is not None else lambda name: None
        try:
            if self.atlas is None:
                self.atlas = dist.on_main(lambda: NeuronAtlas.from_config(model, self.tokenizer, cfg, self.sources, capture,
                                                                              progress=dist.is_main()))
                if dist.is_main() and output_dir is not None:
                    save_atlas(Path(output_dir), self.atlas)
            capture.track([t.to(next(model.parameters()).device) for t in self.atlas.per_layer()])
            task = self.sources.load("task")
            self.monitor = EntanglementMonitor(capture, self.tokenizer, self.atlas, cfg, task, bundled("refusal_openings"),
                                               bundled("compliance_openings"), steps_in_backward=backend == "deepspeed")
            self.monitor.start(part("monitor"))
            self.heads = RefusalHeadMonitor.build(model, layers, self.tokenizer, self.atlas, cfg, part("heads"), restored is not None)
            self.freezer = NeuronFreezer(capture)
            if reg_cls is not None:
                self.regularizer = reg_cls.build(BuildContext(model, self.tokenizer, capture, self.atlas, cfg, self.monitor,
                                                              self.freezer, self.sources, part("regularizer")))
        except BaseException:
            capture.remove()
            raise
        self.tie = LossTie(self.regularizer, self.backward_scale)
        if inject_loss:
            capture.output_taps.append(self.tie)
        if restored is not None:  # the monitor, heads and regularizer took theirs when they were built
            for name in ("freezer", "policy", "tie"):
                self._parts()[name].load_state_dict(restored.parts[name])
            self.history = restored.history
        else:
            self.execute(self.policy.start(), step=0)
        self.events.write({"event": "start", "step": 0, "atlas": self.atlas.settings, "num_safety": self.atlas.num_safety,
                           "mode": cfg.policy.mode, "thresholds": cfg.policy.thresholds, "resumed": restored is not None,
                           "regularizer": reg_cls.name if reg_cls is not None else None, "optimised_signals": self.optimised_signals(),
                           "refusal_heads": self.heads.count if self.heads is not None else 0})

    def teardown(self) -> None:
        """Remove every hook (the capture owns them all); the model is left as it is. Safe to call again."""
        if self.capture is not None:
            self.capture.remove()
        self.events.close()

    def finish(self, step: int) -> None:
        """End the run at optimizer step ``step``: a last check if the schedule skipped it, an ``end`` event,
        and :meth:`teardown`. The guard cannot guard another run after this."""
        if self.monitor is not None and self.history and self.history[-1]["step"] != step:
            self.check(step)
        self.events.write({"event": "end", "step": step, "level": self.level})
        self.teardown()
        self._ended = step

    # -- the check -----------------------------------------------------------------------------
    def check(self, step: int) -> Report:
        """Measure, log and let the policy act. Returns the :class:`Report` (its values are also in
        :attr:`history` and the event log)."""
        if self.monitor is None or self.freezer is None:
            raise RuntimeError("GuardEngine.check() before setup(): call engine.setup(model, tokenizer) first")
        values = self.monitor.measure()
        if not values:
            return Report(step, values)
        if self.heads is not None:
            values.update(self.heads.measure())
        if self.regularizer is not None:
            values.update(self.regularizer.logged())
        verdict = self.policy.decide(values, acting=self.tie.reg_lambda > 0 or self.freezer.count > 0)
        decision, report = verdict.decision, Report(step, values, verdict.decision)
        if decision.faults:
            self.events.fault(step, decision.faults, self.monitor.nonfinite_layers(), self.level, verdict.new_fault)
        for c in verdict.warn:  # once per crossing: not again while the metric stays over
            warn_main("rimguard: %s=%.4g crossed the '%s' threshold %.4g at step %d", c.metric, c.value, c.level, c.threshold, step)
        if verdict.plan is not None:
            self.events.level(step, decision.previous, decision.level, decision.crossings)
            self.execute(verdict.plan, step, report)
            if self.on_alert is not None:
                self.on_alert(decision, dict(values), step)
        values.update({"level": float(LEVELS.index(self.level)), "reg_lambda": self.tie.reg_lambda, "frozen": float(self.freezer.count)})
        record = {"event": "metrics", "step": step, **values, "action": self.action}
        self.history.append(record)
        self.events.write(record)
        return report

    def execute(self, plan: Plan, step: int, report: Report | None = None) -> None:
        """Apply ``plan``: lambda follows 'regularize' (in force or not); every other action runs its executor."""
        cfg = self.config.actions
        base = 0.0
        if "regularize" in plan.actions and self.regularizer is not None:
            base = self.regularizer.default_lambda if cfg.reg_lambda is None else float(cfg.reg_lambda)
        self.tie.set_lambda(base * (LAMBDA_FACTOR[plan.level] if cfg.adaptive_lambda else 1.0))
        for action in plan.actions:
            EXECUTORS[action](self, plan, step, report)

    # -- checkpoint state ----------------------------------------------------------------------
    def _parts(self) -> dict[str, Any]:
        """The stateful parts, by the name their state is saved under (each has ``state_dict() -> Saved``)."""
        parts = {"policy": self.policy, "tie": self.tie, "monitor": self.monitor, "freezer": self.freezer, "regularizer": self.regularizer}
        return {name: part for name, part in {**parts, "heads": self.heads}.items() if part is not None}

    def state(self) -> GuardState:
        """Everything needed to resume (see :mod:`rimguard.state`)."""
        assert self.atlas is not None
        return GuardState(self.run_id, self.atlas, self.history, {name: p.state_dict() for name, p in self._parts().items()},
                          measured_settings(self.config), self.owner)

    def restore(self, checkpoint: str | Path, step: int, output_dir: str | Path) -> GuardState | None:
        """The guard state of the Trainer checkpoint ``checkpoint`` (step ``step``), to pass to :meth:`setup`;
        without one, ``on_missing_state`` decides (:func:`rimguard.state.resume_state`) and None is returned."""
        state, atlas = resume_state(checkpoint, step, self.config.monitor.on_missing_state, output_dir)
        if state is None:
            self.rebased = True
            self.atlas = self.atlas or atlas
        return state
