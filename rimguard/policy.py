"""The policy: risk levels from metrics, and what the guard does at each level. Pure and deterministic.

Levels rise ``ok -> warn -> regularize -> freeze -> stop``. At each check:

* a level is *triggered* when any of its metrics is at or above its threshold;
* the *target* is the highest triggered level, except that the current level is kept while
  any of its metrics stays above ``threshold - hysteresis * |threshold|`` (so a noisy metric
  near a threshold does not flap);
* the level rises to the target only after the target has held for ``patience`` consecutive
  checks; it falls at once;
* while an action is in force, the level falls only once the *witness* (a behavioural signal on
  the monitor's own probes, which no action trains on) is no worse than when the level was raised:
  an action that optimises what the thresholds read cannot talk the guard back to ``ok`` while
  safety is gone;
* a non-finite metric is a *fault*, not a reading: the level never falls at a check with a
  fault, and rises at once to at least ``fault_level``.

A level's *plan* is what the guard does there (:data:`MODE_ACTIONS`, or the user's per-level
actions), plus the one-off actions of levels a rise jumped over. All ranks feed the policy the
same reduced metrics, so they take the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, get_args

from rimguard.saved import Saved

Level = Literal["ok", "warn", "regularize", "freeze", "stop"]
Action = Literal["warn", "regularize", "freeze_top", "freeze", "checkpoint", "stop"]
LEVELS: tuple[str, ...] = get_args(Level)
ACTIONS: tuple[str, ...] = get_args(Action)

# What each level does under each mode; "ok" is the level before any threshold is crossed.
MODE_ACTIONS: dict[str, dict[str, list[str]]] = {
    "monitor": {"ok": [], "warn": ["warn"], "regularize": ["warn"], "freeze": ["warn"], "stop": ["warn"]},
    "regularize": {
        "ok": ["regularize"], "warn": ["warn", "regularize"], "regularize": ["warn", "regularize"],
        "freeze": ["warn", "regularize"], "stop": ["warn", "regularize"],
    },
    "freeze": {"ok": ["freeze"], "warn": ["warn", "freeze"], "regularize": ["warn", "freeze"], "freeze": ["warn", "freeze"],
               "stop": ["warn", "freeze"]},
    "escalate": {
        "ok": [], "warn": ["warn", "checkpoint"], "regularize": ["warn", "regularize"],
        "freeze": ["warn", "regularize", "freeze_top"], "stop": ["warn", "regularize", "freeze", "stop"],
    },
}
ONE_OFF_ACTIONS = ("checkpoint", "freeze_top", "freeze")  # still taken when a rise jumps over their level
LAMBDA_FACTOR = {"ok": 1.0, "warn": 1.0, "regularize": 1.0, "freeze": 2.0, "stop": 4.0}  # adaptive_lambda: lambda x factor
WITNESS = "refusal_drop"  # behavioural, on the monitor's own probes: no action optimises it


def default_thresholds() -> dict[str, dict[str, float]]:
    """The default alarm: per level, metric -> threshold (the ``thresholds`` option's default)."""
    # safety_drop (the paper's delta-minus-safe: the safety neurons' activation loss on the monitor's
    # harmful probes) measured best across 16 fine-tunes of the aligned SmolLM2-135M that forgot by
    # different amounts (benchmarks/RESULTS.md section 2): Spearman 0.85 [0.57, 0.97] with the final
    # refusal loss at 25% of training, and 0.5 at that check separated all 14 forgetting runs from the 2
    # that kept their refusals. entanglement_z, the former default, fired in both runs that kept their
    # refusals (rho 0.14). Only the warn value is measured; regularize and freeze are 2x and 4x it, and
    # the scale of safety_drop depends on the model: calibrate on yours with one monitor run (docs/guide.md).
    return {"warn": {"safety_drop": 0.5}, "regularize": {"safety_drop": 1.0}, "freeze": {"safety_drop": 2.0}, "stop": {}}


@dataclass
class Crossing:
    """A metric at or above a level's threshold."""

    level: str
    metric: str
    value: float
    threshold: float


@dataclass
class Decision:
    """Outcome of one check."""

    level: str
    previous: str
    crossings: list[Crossing] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # metrics that were NaN or infinite

    @property
    def changed(self) -> bool:
        return self.level != self.previous


@dataclass
class RiskPolicy:
    """Stateful level tracker; its state is ``level`` and ``streak`` (saved on checkpoint)."""

    thresholds: Mapping[str, Mapping[str, float]]
    hysteresis: float = 0.1
    patience: int = 1
    fault_level: str = "warn"
    level: str = "ok"
    streak: int = 0

    def crossings(self, metrics: Mapping[str, float]) -> list[Crossing]:
        out = []
        for level in LEVELS[1:]:
            for metric, threshold in self.thresholds.get(level, {}).items():
                value = metrics.get(metric)
                if value is not None and value >= threshold:
                    out.append(Crossing(level, metric, float(value), float(threshold)))
        return out

    def _holds(self, level: str, metrics: Mapping[str, float]) -> bool:
        rules = self.thresholds.get(level, {})
        return any(
            metrics.get(m) is not None and metrics[m] >= t - self.hysteresis * abs(t) for m, t in rules.items()
        )

    def update(self, metrics: Mapping[str, float], may_fall: bool = True) -> Decision:
        """Feed one check's metrics; returns the (possibly new) level, the crossings and the faults."""
        rank = {name: i for i, name in enumerate(LEVELS)}
        faults = sorted(m for m, v in metrics.items() if not _finite(v))
        if faults:
            previous = self.level
            self.level, self.streak = LEVELS[max(rank[self.level], rank[self.fault_level])], 0
            return Decision(self.level, previous, self.crossings({m: v for m, v in metrics.items() if _finite(v)}), faults)
        crossed = self.crossings(metrics)
        target = max((rank[c.level] for c in crossed), default=0)
        current = rank[self.level]
        if target <= current and current > 0 and (self._holds(self.level, metrics) or not may_fall):
            target = current
        previous = self.level
        if target > current:
            self.streak += 1
            if self.streak >= self.patience:
                self.level, self.streak = LEVELS[target], 0
        else:
            self.streak = 0
            self.level = LEVELS[target]
        return Decision(self.level, previous, crossed)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


ActionsOf = Callable[[str], list[str]]  # level -> its actions (PolicyConfig.actions_for)


@dataclass
class Plan:
    """What the guard does at a level: that level's actions, plus the one-off actions of the levels a
    rise jumped over (a jump from ok to freeze still saves the warn checkpoint)."""

    level: str
    actions: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, actions_for: ActionsOf, level: str, previous: str | None = None) -> "Plan":
        previous = level if previous is None else previous
        jumped = LEVELS[LEVELS.index(previous) + 1 : LEVELS.index(level)]
        one_off = [a for lvl in jumped for a in actions_for(lvl) if a in ONE_OFF_ACTIONS]
        return cls(level, list(dict.fromkeys(one_off + actions_for(level))))


@dataclass
class Report:
    """One check's outcome, for the training loop: the logged values and what the plan asks of the loop."""

    step: int
    values: dict[str, float]  # metric -> value (empty when the monitor had nothing to measure yet)
    decision: Decision | None = None
    save: bool = False  # save a checkpoint now (the 'checkpoint' action)
    stop: bool = False  # stop training (the 'stop' action)


@dataclass
class Verdict:
    """One check, decided: the :class:`Decision`, the plan to run if the level changed, the crossings to
    warn about (new ones, at a level whose actions warn) and whether a fault episode began."""

    decision: Decision
    plan: Plan | None
    warn: list[Crossing]
    new_fault: bool


class GuardPolicy:
    """:class:`RiskPolicy` plus what the guard's decisions need around it: the witness gate, one
    warning per crossing, fault episodes and each level's plan.

    Args:
        risk: the level tracker.
        actions_for: a level's actions (``PolicyConfig.actions_for``).
    """

    def __init__(self, risk: RiskPolicy, actions_for: ActionsOf) -> None:
        self.risk, self.actions_for = risk, actions_for
        self.witness: float | None = None  # WITNESS when the current level was raised
        self.checkpointed = False  # the one-off 'checkpoint' action was taken
        self._crossed: set[tuple[str, str]] = set()  # (level, metric) over threshold at the last check
        self._faults: set[str] = set()  # non-finite metrics at the last check

    @classmethod
    def of(cls, config: Any) -> "GuardPolicy":
        """From a :class:`~rimguard.config.PolicyConfig`."""
        return cls(RiskPolicy(config.thresholds, config.hysteresis, config.patience, config.fault_level), config.actions_for)

    @property
    def level(self) -> str:
        return self.risk.level

    def start(self) -> Plan:
        """The plan of the starting level (a mode that acts from step 0)."""
        return Plan.of(self.actions_for, self.level)

    def decide(self, values: Mapping[str, float], acting: bool) -> Verdict:
        """Feed one check's metrics; ``acting``: whether an action is in force (then the witness gate applies)."""
        now = values.get(WITNESS)
        may_fall = not acting or now is None or self.witness is None or now <= self.witness
        decision = self.risk.update(values, may_fall=may_fall)
        if LEVELS.index(decision.level) > LEVELS.index(decision.previous):
            self.witness = now
        crossed = {(c.level, c.metric) for c in decision.crossings}
        warns = "warn" in self.actions_for(decision.level)
        new = [c for c in decision.crossings if warns and (c.level, c.metric) not in self._crossed]
        self._crossed = crossed
        new_fault = bool(decision.faults) and not self._faults
        self._faults = set(decision.faults)
        plan = Plan.of(self.actions_for, decision.level, decision.previous) if decision.changed else None
        return Verdict(decision, plan, new, new_fault)

    def state_dict(self) -> Saved:
        return Saved(meta={"level": self.risk.level, "streak": self.risk.streak, "witness": self.witness,
                           "checkpointed": self.checkpointed})

    def load_state_dict(self, state: Saved) -> None:
        meta = state.meta
        self.risk.level, self.risk.streak, self.witness, self.checkpointed = (meta["level"], meta["streak"], meta.get("witness"),
                                                                              meta["checkpointed"])


def optimised_signals(actions_for: ActionsOf, regularizer_signals: tuple[str, ...]) -> list[str]:
    """The logged signals that the configured actions optimise directly (so they cannot witness their success):
    the regularizer's (:attr:`rimguard.actions.regularizer.Regularizer.optimises`) when any level regularizes.
    Freezing optimises no logged signal."""
    acts = {a for lvl in LEVELS for a in actions_for(lvl)}
    return sorted(set(regularizer_signals) if "regularize" in acts else set())
