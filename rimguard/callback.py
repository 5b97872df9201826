"""``RIMGuard``: :class:`~rimguard.engine.GuardEngine` as a ``transformers`` ``TrainerCallback``.

Works with ``transformers.Trainer`` and its subclasses (TRL's SFT, DPO, GRPO trainers)::

    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok)
    guard = RIMGuard.attach(trainer, GuardConfig(mode="regularize", probe_every=10))
    trainer.train()

``RIMGuard(config)`` in ``callbacks=[...]`` also works. Knowing its trainer (``attach`` or
``trainer=``) lets the guard log ``rimguard/*`` scalars through ``Trainer.log`` (so ``report_to``
carries them to TensorBoard or wandb), follow a partial gradient-accumulation window, and scale
its gradient by an fp16 ``GradScaler``; without it, metrics go to ``output_dir/rimguard.jsonl``
and to :attr:`history` only, and fp16 loss scaling is refused for the regularizers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from rimguard import dist
from rimguard.atlas import NeuronAtlas
from rimguard.compat import resumed_checkpoint
from rimguard.config import GuardConfig
from rimguard.engine import GuardEngine
from rimguard.policy import Report
from rimguard.state import STATE_DIR, adopt_pending, pending_state

logger = logging.getLogger("rimguard")


class RIMGuard(TrainerCallback):
    """The guard as a Trainer callback: thin glue over a :class:`GuardEngine` (:attr:`engine`), built from the
    same arguments, plus ``trainer`` (optional: see the module docstring).

    What a run reads: :attr:`history`, :attr:`level`, :attr:`action`, :attr:`atlas`; the rest is
    :attr:`engine` (its monitor, regularizer, freezer, ...).
    """

    def __init__(self, config: Any = None, *, trainer: Any = None, **kwargs: Any) -> None:
        self.engine = GuardEngine(config, **kwargs)
        self.trainer = trainer

    @classmethod
    def attach(cls, trainer: Any, config: Any = None, **kwargs: Any) -> "RIMGuard":
        """Create a guard that knows ``trainer`` and add it to the trainer's callbacks."""
        guard = cls(config, trainer=trainer, **kwargs)
        trainer.add_callback(guard)
        return guard

    # -- what a run reads ----------------------------------------------------------------------
    @property
    def config(self) -> GuardConfig:
        return self.engine.config

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every check's record (metrics, level, lambda, frozen count, action), in step order."""
        return self.engine.history

    @property
    def level(self) -> str:
        """The risk level now (what the signals say)."""
        return self.engine.level

    @property
    def action(self) -> str:
        """What the guard is doing now (regularizing, freezing, or monitoring only)."""
        return self.engine.action

    @property
    def atlas(self) -> NeuronAtlas | None:
        """The safety-critical neurons (identified or loaded at train begin)."""
        return self.engine.atlas

    def detach(self) -> None:
        """Take the guard's hooks off the model (penalty, freeze, taps); the model is left as it is. The end of
        ``train()`` does this; after an interrupted one (Ctrl-C in a notebook) call it, or the next guard on the
        model will."""
        self.engine.teardown()

    # -- TrainerCallback ---------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        engine = self.engine
        engine.backward_scale = self._backward_scale(args)
        engine.owner = _trainer_token(state)  # on a resume: the checkpoint's (the Trainer loaded its state already)
        checkpoint = resumed_checkpoint(args, state.global_step)  # where the Trainer resumed from, inside output_dir or not
        restored = engine.restore(checkpoint, state.global_step, args.output_dir) if checkpoint is not None else None
        processing = kwargs.get("processing_class")
        engine.setup(kwargs["model"], engine.tokenizer or getattr(processing, "tokenizer", processing), args.output_dir,
                     restored=restored, backend=_backend(args))
        if self.trainer is None and dist.is_main() and any(r != "none" for r in (args.report_to or [])):
            logger.info("rimguard: metrics go to %s/%s; to send rimguard/* scalars to report_to too, add the guard with "
                        "RIMGuard.attach(trainer, config)", args.output_dir, self.config.monitor.log_file)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.engine.begin_step(state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.engine.before_optimizer_step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.engine.after_optimizer_step()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        report = self.engine.end_step(state.global_step)
        if report is not None:
            self._follow(report, control)
        if control.should_save and self.engine.monitor is not None and dist.is_main():
            # written now, before the Trainer saves and rotates older checkpoints out; moved in at on_save
            self.engine.owner = _trainer_token(state)
            self.engine.state().save(pending_state(args.output_dir, state.global_step))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.engine.monitor is not None and dist.is_main():
            target = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_DIR
            if not adopt_pending(args.output_dir, state.global_step, target):  # a save this guard did not see coming
                self.engine.owner = _trainer_token(state)
                self.engine.state().save(target)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        last = len(self.history)
        self.engine.finish(state.global_step)
        if len(self.history) > last:  # the final check
            self._log(self.history[-1])

    # -- glue ----------------------------------------------------------------------------------
    def _follow(self, report: Report, control: TrainerControl) -> None:
        """Carry a check's plan to the Trainer: checkpoint, stop, and the metrics to ``Trainer.log``."""
        control.should_save = control.should_save or report.save
        control.should_training_stop = control.should_training_stop or report.stop
        if report.values:
            self._log(self.history[-1])

    def _log(self, record: dict[str, Any]) -> None:
        if self.trainer is None:
            return
        numbers = {f"rimguard/{k}": v for k, v in record.items() if k not in ("event", "step", "action")}
        should_log = self.trainer.control.should_log  # Trainer.log resets it: keep the step's own loss log
        self.trainer.log(numbers)
        self.trainer.control.should_log = should_log

    def _backward_scale(self, args: TrainingArguments):
        """(micro-batches in this optimizer step, loss scale) of the Trainer's backward, for the loss tie."""
        trainer = self.trainer
        if trainer is None:
            if getattr(args, "fp16", False) and self.config.policy.regularizes():
                raise RuntimeError("rimguard: fp16 training scales the loss with a GradScaler the guard can only follow when it "
                                   "knows the trainer: add it with RIMGuard.attach(trainer, config) (or use bf16)")
            steps = max(int(args.gradient_accumulation_steps), 1)
            return lambda: (steps, 1.0)
        one = torch.ones((), device=trainer.args.device)  # made once: no host-to-device copy per forward

        def scale() -> tuple[int, torch.Tensor | float]:
            steps = max(int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1), 1)
            scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
            # GradScaler.scale multiplies on the device: no host sync
            return steps, scaler.scale(one) if scaler is not None and scaler.is_enabled() else 1.0

        return scale


def _trainer_token(state: TrainerState) -> str:
    """A digest of the Trainer's log history before the current step: the same when the guard saves (before the
    step's own logs) and in the state a resume from that checkpoint loads; different for another run's checkpoint."""
    before = [e for e in state.log_history if e.get("step", 0) < state.global_step]
    return hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _backend(args: TrainingArguments) -> str:
    """How the Trainer trains the model: ``"deepspeed"``, ``"ddp"`` (several processes) or ``"single"``. FSDP2 and ZeRO-3 are read
    off the model (FSDP2's parameters are DTensors; on CPU the Trainer runs DDP even when ``fsdp`` is set)."""
    if getattr(args, "deepspeed", None):
        return "deepspeed"
    return "ddp" if int(getattr(args, "world_size", 1) or 1) > 1 else "single"
