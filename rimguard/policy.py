"""Risk levels from metrics: thresholds, hysteresis and patience. Pure and deterministic.

Levels rise ``ok -> warn -> regularize -> freeze -> stop``. At each check:

* a level is *triggered* when any of its metrics is at or above its threshold;
* the *target* is the highest triggered level, except that the current level is kept while
  any of its metrics stays above ``threshold - hysteresis * |threshold|`` (so a noisy metric
  near a threshold does not flap);
* the level rises to the target only after the target has held for ``patience`` consecutive
  checks; it falls at once;
* the caller can forbid a fall (``may_fall=False``): the guard does so while an action is in
  force and the signals it does not optimise have not recovered;
* a non-finite metric is a *fault*, not a reading: the level never falls at a check with a
  fault, and rises at once to at least ``fault_level``.

All ranks feed the policy the same reduced metrics, so they take the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from rimguard.config import LEVELS


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
