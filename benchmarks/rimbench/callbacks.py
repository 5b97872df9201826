"""Trainer callbacks of the benchmarks: the step timer, the loss log and the guard on a fixed check schedule."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from rimguard import RIMGuard


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, end to end: from the previous step's end (the first step: its
    ``on_step_begin``) to this callback's ``on_step_end``. Everything a training step costs is in:
    data loading, every callback's ``on_step_begin`` (the safety anchor's forward runs there), the
    step itself and the callbacks before this one at ``on_step_end`` (the guard's checks).

    Place it after the guard and before any evaluation callback: the guard's own work at that step is
    then counted and evaluation is not. ``times`` maps step -> seconds.
    """

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times[state.global_step] = now - self._last
        self._last = now


class LossLog(TrainerCallback):
    """The training loss of every logged step: ``losses`` is a list of ``(step, loss)``."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


class ScheduledGuard(RIMGuard):
    """RIMGuard whose checks run exactly at ``check_steps``; its set-up (identification, references, the
    anchor record) is timed in ``setup_seconds``."""

    def __init__(self, *args: Any, check_steps: list[int], **kwargs: Any) -> None:
        super().__init__(*args, schedule=set(check_steps).__contains__, **kwargs)
        self.setup_seconds = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        super().on_train_begin(*args, **kwargs)
        self.setup_seconds = time.perf_counter() - start
