"""Guard configuration: one validated dataclass, loadable from and savable to YAML or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

LEVELS = ("ok", "warn", "regularize", "freeze", "stop")
ACTIONS = ("warn", "regularize", "freeze_top", "freeze", "checkpoint", "stop")
METRICS = ("entanglement_z", "entanglement_pct", "ras_safe", "safety_drop", "task_rise", "kl_task", "refusal_drop")
MODES = ("monitor", "regularize", "freeze", "escalate")
REGULARIZERS = ("anchor", "activation", "params")
# lambda when penalty_weight is None, per regularizer (see benchmarks/RESULTS.md for how they were chosen)
DEFAULT_WEIGHTS = {"anchor": 1.0, "activation": 1.0, "params": 10.0}
# Which logged signals an action optimises directly (so they cannot witness its success). The
# refusal margin and KL are measured on probes no action trains on.
OPTIMISED_SIGNALS: dict[str, tuple[str, ...]] = {
    "activation": ("ras_safe", "safety_drop", "task_rise", "entanglement_z", "entanglement_pct"),
    # the anchor's KL acts on behaviour on its own prompts; its neuron term (anchor_act_weight > 0) holds
    # the safety neurons up there, which on SmolLM2 carried over to the monitor's probes (RAS, z < 0)
    "anchor": (),
    "anchor+neurons": ("safety_drop", "ras_safe", "entanglement_z", "entanglement_pct"),
    "params": (),
    "freeze": (),
}

# What each level does under each mode; "ok" is the level before any threshold is crossed.
MODE_ACTIONS: dict[str, dict[str, list[str]]] = {
    "monitor": {"ok": [], "warn": ["warn"], "regularize": ["warn"], "freeze": ["warn"], "stop": ["warn"]},
    "regularize": {
        "ok": ["regularize"], "warn": ["warn", "regularize"], "regularize": ["warn", "regularize"],
        "freeze": ["warn", "regularize"], "stop": ["warn", "regularize"],
    },
    "freeze": {"ok": ["freeze"], "warn": ["warn", "freeze"], "regularize": ["warn", "freeze"], "freeze": ["warn", "freeze"], "stop": ["warn", "freeze"]},
    "escalate": {
        "ok": [], "warn": ["warn", "checkpoint"], "regularize": ["warn", "regularize"],
        "freeze": ["warn", "regularize", "freeze_top"], "stop": ["warn", "regularize", "freeze", "stop"],
    },
}


class ConfigError(ValueError):
    """An invalid guard configuration; the message names the field."""


def _default_thresholds() -> dict[str, dict[str, float]]:
    # safety_drop (the paper's delta-minus-safe: the safety neurons' activation loss on the monitor's
    # harmful probes) measured best across 16 fine-tunes of the aligned SmolLM2-135M that forgot by
    # different amounts (benchmarks/RESULTS.md section 2): Spearman 0.85 [0.57, 0.97] with the final
    # refusal loss at 25% of training, and 0.5 at that check separated all 14 forgetting runs from the 2
    # that kept their refusals. entanglement_z, the former default, fired in both runs that kept their
    # refusals (rho 0.14). Only the warn value is measured; regularize and freeze are 2x and 4x it, and
    # the scale of safety_drop depends on the model: calibrate on yours with one monitor run (docs/guide.md).
    return {
        "warn": {"safety_drop": 0.5},
        "regularize": {"safety_drop": 1.0},
        "freeze": {"safety_drop": 2.0},
        "stop": {},
    }


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type: ``bool`` is not an ``int``; a ``float`` field takes
    finite ints and floats; containers are checked at the top level (their entries are checked by
    :meth:`GuardConfig.validate`)."""
    if get_origin(hint) in (Union, UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, get_origin(hint) or hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    names = {type(None): "None", bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             dict: "a mapping", list: "a list"}
    return names.get(get_origin(hint) or hint, str(hint))


@dataclass
class GuardConfig:
    """How rimguard finds neurons, measures entanglement and acts.

    Atlas (used when no atlas is loaded):
        method: ``"counterfactual"`` (paper) or ``"effect_size"`` (harmful vs harmless).
        top_m: neurons kept per pair: a count, or a fraction of all neurons if < 1.
        min_share: keep neurons in the top-m of at least this share of pairs (1.0 = intersection).
        num_controls: random control sets for the null distribution of RAS.
        num_safety_probes: harmful prompts used (from the start of the given list).
        max_new_tokens: length of the model's own greedy response appended to each probe.
        max_length: probe sequence cap, tokens.

    Monitoring:
        probe_every: optimizer steps between safety probe passes (and metric logs).
        probe_batch_size: sequences per probe forward.
        ema_decay: smoothing of the streamed reasoning activations, per optimizer step.
        kl_probes: reasoning sequences kept for KL(pi_0 || pi_t); 0 disables KL.
        margin_probes: harmful probes (of the safety probes) scored for the refusal margin; each
            runs once plus one short forward per opening, so this bounds most of a check's cost
            beyond the safety pass. 0 disables the margin.
        kl_top_k: base log-probs stored per position (the rest is one tail bucket).
        rel_floor: activation floor for RAS, relative to the mean base activation.
        log_file: JSONL file name in ``output_dir`` (None: no file).
        on_missing_state: a resume whose checkpoint lacks the guard's state: ``"error"`` (default:
            refuse, naming the remedies), ``"atlas"`` (reuse ``output_dir/rimguard_atlas`` and re-take
            references now) or ``"fresh"`` (identify anew on the current weights).

    Policy and actions:
        mode: preset of actions per level: ``monitor`` (warn only), ``regularize`` (penalty from
            step 0), ``freeze`` (freeze from step 0) or ``escalate`` (warn, then regularize, then
            freeze the most-shifted neurons, then all and stop).
        thresholds: per level, metric -> value; a level is reached when any of its metrics is
            at or above its value (all metrics are "higher is riskier").
        actions: per level, the actions to run; overrides the mode's preset where given.
        hysteresis: a reached level is left only when every metric is below
            ``value - hysteresis * |value|``.
        patience: consecutive probe checks a higher level must hold before escalating.
        fault_level: the level a check rises to (at least) when a metric is NaN or infinite, a
            fault rather than a reading; the level never falls at such a check (``"ok"``: only keep it).
        regularizer: what the ``regularize`` action adds to the loss: ``"anchor"`` (default: the
            self-distilled safety anchor, KL to the base model's own responses to anchor prompts
            plus a one-sided hold on the safety neurons' activations there, see
            :mod:`rimguard.actions.anchor`), ``"activation"`` (anchor the safety neurons' activations on
            the training batch to their base values) or ``"params"`` (L2-SP pull to the base weights).
        penalty_weight: lambda of the regularizer; None takes its default (``DEFAULT_WEIGHTS``).
        adaptive_penalty: scale lambda by the level (x1 at regularize, x2 at freeze, x4 at stop).
        anchor_every: optimizer steps between anchor batches (the anchor's cost falls with it). 4 met
            every prevention target on the benchmark's three runs where every step over-refused
            (benchmarks/RESULTS.md section 1).
        anchor_batch_size: anchor rows per anchor batch (harmful and harmless look-alikes mixed).
        anchor_act_weight: weight of the anchor's neuron term (the paper's delta-minus-safe side)
            relative to its KL term. Default 0: on SmolLM2 it added no retention (100% kept with and
            without) but drove the monitor's RAS and z below zero, blinding them (benchmarks/RESULTS.md).
        anchor_harmless: also anchor harmless look-alike prompts to the base model's own answers,
            so the anchor does not teach blanket refusal (over-refusal).
        anchor_max_new_tokens: length of the recorded base responses, tokens.
        anchor_top_k: base log-probs recorded per response token (the rest is one tail bucket).
        param_scope: ``"all"`` trainable parameters or only the safety neurons' slices (``params``).
        freeze_top_fraction: share of the safety neurons (the most shifted) that ``freeze_top`` freezes.
        freeze_share: if set, ``freeze`` holds this share of *all* MLP neurons, the highest by the
            atlas' selection score, instead of the atlas' safety set.
    """

    method: str = "counterfactual"
    top_m: float = 0.01
    min_share: float = 0.5
    num_controls: int = 32
    num_safety_probes: int = 64
    max_new_tokens: int = 24
    max_length: int = 256

    probe_every: int = 10
    probe_batch_size: int = 8
    ema_decay: float = 0.9
    kl_probes: int = 8
    margin_probes: int = 16
    kl_top_k: int = 64
    rel_floor: float = 0.05
    log_file: str | None = "rimguard.jsonl"
    on_missing_state: str = "error"

    mode: str = "monitor"
    thresholds: dict[str, dict[str, float]] = field(default_factory=_default_thresholds)
    actions: dict[str, list[str]] = field(default_factory=dict)
    hysteresis: float = 0.1
    patience: int = 1
    fault_level: str = "warn"
    regularizer: str = "anchor"
    penalty_weight: float | None = None
    adaptive_penalty: bool = False
    anchor_every: int = 4
    anchor_batch_size: int = 8
    anchor_act_weight: float = 0.0
    anchor_harmless: bool = True
    anchor_max_new_tokens: int = 32
    anchor_top_k: int = 32
    param_scope: str = "all"
    freeze_top_fraction: float = 0.25
    freeze_share: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"GuardConfig.{name}: {what} (got {getattr(self, name)!r})")

        hints = get_type_hints(GuardConfig)
        for f in fields(self):  # types first: a string '10' or a truthy "no" never reaches the range checks
            need(_has_type(getattr(self, f.name), hints[f.name]), f.name, f"must be {_type_name(hints[f.name])}")

        need(self.method in ("counterfactual", "effect_size"), "method", "must be 'counterfactual' or 'effect_size'")
        need(self.top_m > 0, "top_m", "must be > 0")
        need(0 < self.min_share <= 1, "min_share", "must be in (0, 1]")
        need(self.num_controls >= 2, "num_controls", "must be >= 2 for a null distribution")
        need(self.num_safety_probes >= 2, "num_safety_probes", "must be >= 2")
        need(self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0")
        need(self.max_length >= 8, "max_length", "must be >= 8")
        need(self.probe_every >= 1, "probe_every", "must be >= 1")
        need(self.probe_batch_size >= 1, "probe_batch_size", "must be >= 1")
        need(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")
        need(self.kl_probes >= 0, "kl_probes", "must be >= 0")
        need(self.margin_probes >= 0, "margin_probes", "must be >= 0")
        need(self.kl_top_k >= 1, "kl_top_k", "must be >= 1")
        need(self.rel_floor > 0, "rel_floor", "must be > 0")
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(0 <= self.hysteresis < 1, "hysteresis", "must be in [0, 1)")
        need(self.patience >= 1, "patience", "must be >= 1")
        need(self.fault_level in LEVELS, "fault_level", f"must be one of {LEVELS}")
        need(self.on_missing_state in ("error", "atlas", "fresh"), "on_missing_state", "must be 'error', 'atlas' or 'fresh'")
        need(self.regularizer in REGULARIZERS, "regularizer", f"must be one of {REGULARIZERS}")
        need(self.penalty_weight is None or 0 <= self.penalty_weight < float("inf"), "penalty_weight", "must be finite and >= 0")
        need(self.anchor_every >= 1, "anchor_every", "must be >= 1")
        need(self.anchor_batch_size >= 1, "anchor_batch_size", "must be >= 1")
        need(0 <= self.anchor_act_weight < float("inf"), "anchor_act_weight", "must be finite and >= 0")
        need(self.anchor_max_new_tokens >= 1, "anchor_max_new_tokens", "must be >= 1")
        need(self.anchor_top_k >= 1, "anchor_top_k", "must be >= 1")
        need(self.param_scope in ("all", "safety"), "param_scope", "must be 'all' or 'safety'")
        need(self.freeze_share is None or 0 < self.freeze_share <= 1, "freeze_share", "must be in (0, 1]")
        need(0 < self.freeze_top_fraction <= 1, "freeze_top_fraction", "must be in (0, 1]")
        need(isinstance(self.thresholds, dict), "thresholds", "must be a dict level -> {metric: value}")
        for level, rules in self.thresholds.items():
            need(level in LEVELS[1:], "thresholds", f"unknown level '{level}' (levels: {LEVELS[1:]})")
            need(isinstance(rules, dict), "thresholds", f"'{level}' must map metric names to values, e.g. {{'safety_drop': 0.5}}")
            for metric, value in rules.items():
                need(metric in METRICS, "thresholds", f"unknown metric '{metric}' at level '{level}' (metrics: {METRICS})")
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), "thresholds",
                     f"{level}.{metric} must be a finite number")
        for level, acts in self.actions.items():
            need(level in LEVELS, "actions", f"unknown level '{level}' (levels: {LEVELS})")
            need(isinstance(acts, list) and all(isinstance(a, str) for a in acts), "actions", f"'{level}' must be a list of action names")
            bad = [a for a in acts if a not in ACTIONS]
            need(not bad, "actions", f"unknown actions {bad} at level '{level}' (actions: {ACTIONS})")
        levels = [lvl for lvl in LEVELS[1:] if self.thresholds.get(lvl)]
        for lower, higher in zip(levels, levels[1:]):
            for metric, value in self.thresholds[higher].items():
                below = self.thresholds[lower].get(metric)
                need(below is None or value >= below, "thresholds",
                     f"'{higher}.{metric}'={value} is below '{lower}.{metric}'={below}; levels must rise")

    # -- derived -----------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        """lambda of the chosen regularizer (``penalty_weight``, else its default)."""
        return DEFAULT_WEIGHTS[self.regularizer] if self.penalty_weight is None else float(self.penalty_weight)

    def regularizes(self) -> bool:
        """Whether any level's actions include ``regularize``."""
        return any("regularize" in self.actions_for(level) for level in LEVELS)

    def actions_for(self, level: str) -> list[str]:
        """The actions of ``level``: the explicit ``actions`` entry, else the mode's preset."""
        return list(self.actions.get(level, MODE_ACTIONS[self.mode][level]))

    # -- conversion --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuardConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"GuardConfig: unknown field(s) {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "GuardConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as err:  # noqa: BLE001 - yaml and json raise different types
            raise ConfigError(f"{path}: cannot parse ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of GuardConfig fields")
        return cls.from_dict(data)
