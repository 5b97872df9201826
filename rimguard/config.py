"""Guard configuration: four typed sections (atlas, monitor, policy, actions) in one ``GuardConfig``.

Every option is defined once: a dataclass field with its type (``Literal`` for a choice), its
bounds and its help text in the field's metadata. The same fields are read

* from Python keywords, flat (``GuardConfig(probe_every=5, mode="regularize")``) or by section
  (``GuardConfig(monitor=MonitorConfig(probe_every=5))``);
* from YAML/JSON files (:meth:`GuardConfig.load`; nested as :meth:`GuardConfig.save` writes them,
  or flat);
* from the command line (:func:`add_arguments`: one ``--probe-every``-style flag per field, its
  help and choices from the field).

Field names are unique across sections, so a flat name always means one field.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import reprlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Iterable, Literal, Union, get_args, get_origin, get_type_hints

from rimguard.files import plain_name, write_atomic
from rimguard.policy import ACTIONS, LEVELS, MODE_ACTIONS, Level, default_thresholds

Metric = Literal["entanglement_z", "entanglement_pct", "ras_safe", "safety_drop", "task_rise", "kl_task", "refusal_drop",
                 "refusal_kl", "probe_refusal_drop", "refusal_head_mass", "refusal_head_shift"]
Mode = Literal["monitor", "regularize", "freeze", "escalate"]
METRICS: tuple[str, ...] = get_args(Metric)
MODES: tuple[str, ...] = get_args(Mode)
# fields renamed since 0.1: an old name gets the new one in its error
RENAMED = {"penalty_weight": "reg_lambda", "adaptive_penalty": "adaptive_lambda"}


def regularizer_names() -> list[str]:
    """The registered regularizers (:data:`rimguard.actions.REGULARIZERS`)."""
    from rimguard.actions import REGULARIZERS

    return sorted(REGULARIZERS)


class ConfigError(ValueError):
    """An invalid guard configuration; the message names the field."""


_SHORT = reprlib.Repr()  # attributes, not keywords: Python 3.11's Repr takes none
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset = 2, 6, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40


def short(value: Any) -> str:
    """A bounded repr for error messages: a value read from a file can be huge (a YAML alias chain expands
    to millions of entries when printed in full), the message stays one readable line."""
    text = _SHORT.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def option(default: Any, help: str, choices: Any = None, **bounds: float) -> Any:
    """A config field: its default (a zero-argument callable for a mutable one), its help text, its
    bounds (``ge``, ``gt``, ``le``, ``lt``; checked for numbers, ``None`` passes) and, for a string whose
    values are registered at run time, ``choices`` (a zero-argument callable listing them)."""
    meta = {"help": help, **bounds, **({"choices": choices} if choices else {})}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


_BOUNDS = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"), "le": (lambda v, b: v <= b, "<="),
           "lt": (lambda v, b: v < b, "<")}


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type: ``bool`` is not an ``int``; a ``float`` field takes
    finite ints and floats; a ``Literal`` takes its values; containers are checked at the top level
    (their entries are checked by the section)."""
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, origin or hint)


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    names = {type(None): "None", bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             dict: "a mapping", list: "a list"}
    return names.get(origin or hint, str(hint))


@dataclass
class _Section:
    """Shared validation: every field's type, then its bounds, then the section's own rules."""

    NAME: ClassVar[str]

    def __post_init__(self) -> None:
        self.validate()

    def fail(self, name: str, what: str) -> None:
        raise ConfigError(f"GuardConfig.{self.NAME}.{name}: {what} (got {short(getattr(self, name))})")

    def validate(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # types first: a string '10' or a truthy "no" never reaches the range checks
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                self.fail(f.name, f"must be {_type_name(hints[f.name])}")
            for key, (test, sign) in _BOUNDS.items():
                if key in f.metadata and isinstance(value, (int, float)) and not test(value, f.metadata[key]):
                    self.fail(f.name, f"must be {sign} {f.metadata[key]}")
            if "choices" in f.metadata and value not in f.metadata["choices"]():
                self.fail(f.name, f"must be one of {f.metadata['choices']()}")
        self.check()

    def check(self) -> None:
        """Rules beyond one field's type and bounds."""


@dataclass
class AtlasConfig(_Section):
    """How the safety-critical neurons are found (used when no atlas is loaded)."""

    NAME: ClassVar[str] = "atlas"
    method: Literal["counterfactual", "effect_size"] = option(
        "counterfactual", "'counterfactual' (the paper: harmful prompt vs its malicious-intent sentence) or 'effect_size' "
        "(harmful vs harmless prompts)")
    top_m: float = option(0.01, "neurons kept per pair: a count, or a fraction of all MLP neurons if < 1", gt=0)
    min_share: float = option(0.5, "keep neurons in the top-m of at least this share of pairs (1.0: the intersection)", gt=0, le=1)
    num_controls: int = option(32, "random control neuron sets for the null distribution of RAS", ge=2)
    num_safety_probes: int = option(64, "harmful prompts used to identify the neurons (from the start of the given list); "
                                    "the monitor probes the first check_probes of them", ge=2)
    max_new_tokens: int = option(24, "tokens of the model's own greedy response appended to each probe", ge=1)
    max_length: int = option(256, "probe sequence cap (prompt + response), tokens", ge=8)
    refusal_heads: int = option(0, "attention heads to find and monitor as refusal heads (heads that attend away from a "
                                "reasoning span at the answer position when the model refuses; rimguard.atlas.heads); "
                                "0: none", ge=0)

    def check(self) -> None:
        if self.top_m >= 1 and self.top_m != int(self.top_m):
            self.fail("top_m", "a count (>= 1) must be a whole number; a fraction of all MLP neurons is < 1")


@dataclass
class MonitorConfig(_Section):
    """When and how much the guard measures."""

    NAME: ClassVar[str] = "monitor"
    probe_every: int = option(10, "optimizer steps between checks (safety probe passes and metric logs)", ge=1)
    check_probes: int = option(24, "safety probes measured at each check: the first of the atlas' probes (the smallest "
                               "count whose check-to-check noise in safety_drop is at most 10% of its alarm threshold, "
                               "benchmarks/probe_noise.py)", ge=1)
    probe_batch_size: int = option(8, "sequences per probe forward", ge=1)
    ema_decay: float = option(0.9, "smoothing of the streamed reasoning activations, per optimizer step", ge=0, lt=1)
    kl_probes: int = option(4, "reasoning sequences kept for KL(pi_0 || pi_t) (noise rule as check_probes, at 10% of "
                            "KL's value when safety_drop alarms); 0 disables KL", ge=0)
    margin_probes: int = option(4, "check probes also scored for the refusal margin, sharing their prompt pass (noise rule "
                                "as check_probes, at 10% of the margin drop when safety_drop alarms); 0 disables the margin", ge=0)
    refusal_kl: bool = option(True, "witness: teacher-forced KL(pi_0 || pi_t) on the base model's own responses to the check "
                              "probes (their base log-probs recorded at train start; rimguard.signals.witness)")
    witness_tokens: int = option(12, "witness: greedy opening length (tokens) judged at each check for probe_refusal, the share of "
                                 "check probes the model still refuses; 0 disables it", ge=0)
    head_probes: int = option(16, "harmful probes, each with a reasoning span, whose refusal-head attention is measured at "
                              "each check (one forward each, up to the last layer with a head)", ge=1)
    kl_top_k: int = option(64, "base log-probs stored per position for KL (the rest is one tail bucket)", ge=1)
    kl_max_length: int = option(192, "tokens kept of each KL sequence taken from a training batch (its first real ones), "
                                "so a check costs the same at any training sequence length; 192 is the length the KL "
                                "noise rule was measured at", ge=1)
    rel_floor: float = option(0.05, "activation floor for RAS, relative to the mean base activation", gt=0)
    log_file: str | None = option("rimguard.jsonl", "JSONL log file name in output_dir (none: no file)")
    on_missing_state: Literal["error", "atlas", "fresh"] = option(
        "error", "a resume whose checkpoint lacks the guard's state: 'error' (refuse, naming the remedies), 'atlas' "
        "(reuse output_dir/rimguard_atlas and re-take references now) or 'fresh' (identify anew on the current weights)")

    def check(self) -> None:
        if self.log_file is not None and not plain_name(self.log_file):
            self.fail("log_file", "must be a file name in output_dir, without a folder part (the log stays in the run folder)")

    def is_check_step(self, step: int) -> bool:
        """The default check schedule: every ``probe_every`` optimizer steps, and at steps 1, 2, 4, ... before
        that (forgetting starts early)."""
        return step % self.probe_every == 0 or (step < self.probe_every and step & (step - 1) == 0)


@dataclass
class PolicyConfig(_Section):
    """Risk levels from the metrics, and what each level does."""

    NAME: ClassVar[str] = "policy"
    mode: Mode = option("monitor", "preset of actions per level: 'monitor' (warn only), 'regularize' (regularizer from "
                        "step 0), 'freeze' (freeze from step 0) or 'escalate' (warn, regularize, freeze the most-shifted "
                        "neurons, then freeze all and stop)")
    thresholds: dict[str, dict[str, float]] = option(
        default_thresholds, "per level, metric -> value; a level is reached when any of its metrics is at or above "
        "its value (every metric is 'higher is riskier')")
    level_actions: dict[str, list[str]] = option(dict, "per level, the actions to run; overrides the mode's preset where given")
    hysteresis: float = option(0.1, "a reached level is left only when every metric is below value - hysteresis * |value|",
                               ge=0, lt=1)
    patience: int = option(1, "consecutive checks a higher level must hold before escalating", ge=1)
    fault_level: Level = option("warn", "the level a check rises to (at least) when a metric is NaN or infinite; the "
                                "level never falls at such a check ('ok': only keep it)")

    def check(self) -> None:
        for level, rules in self.thresholds.items():
            if level not in LEVELS[1:]:
                self.fail("thresholds", f"unknown level '{level}' (levels: {LEVELS[1:]})")
            if not isinstance(rules, dict):
                self.fail("thresholds", f"'{level}' must map metric names to values, e.g. {{'safety_drop': 0.5}}")
            for metric, value in rules.items():
                if metric not in METRICS:
                    self.fail("thresholds", f"unknown metric '{metric}' at level '{level}' (metrics: {METRICS})")
                if not _has_type(value, float):
                    self.fail("thresholds", f"{level}.{metric} must be a finite number")
        levels = [lvl for lvl in LEVELS[1:] if self.thresholds.get(lvl)]
        for lower, higher in zip(levels, levels[1:]):
            for metric, value in self.thresholds[higher].items():
                below = self.thresholds[lower].get(metric)
                if below is not None and value < below:
                    self.fail("thresholds", f"'{higher}.{metric}'={value} is below '{lower}.{metric}'={below}; levels must rise")
        for level, acts in self.level_actions.items():
            if level not in LEVELS:
                self.fail("level_actions", f"unknown level '{level}' (levels: {LEVELS})")
            if not (isinstance(acts, list) and all(isinstance(a, str) for a in acts)):
                self.fail("level_actions", f"'{level}' must be a list of action names")
            bad = [a for a in acts if a not in ACTIONS]
            if bad:
                self.fail("level_actions", f"unknown actions {bad} at level '{level}' (actions: {ACTIONS})")

    def actions_for(self, level: str) -> list[str]:
        """The actions of ``level``: its ``level_actions`` entry, else the mode's preset."""
        return list(self.level_actions.get(level, MODE_ACTIONS[self.mode][level]))

    def regularizes(self) -> bool:
        """Whether any level's actions include ``regularize``."""
        return any("regularize" in self.actions_for(level) for level in LEVELS)

    def freezes(self) -> bool:
        """Whether any level's actions freeze neurons (``freeze`` or ``freeze_top``)."""
        return any(a.startswith("freeze") for level in LEVELS for a in self.actions_for(level))


@dataclass
class ActionsConfig(_Section):
    """What the actions do: the regularizer (safety anchor, activation or parameter penalty) and the freeze."""

    NAME: ClassVar[str] = "actions"
    regularizer: str = option(
        "anchor", "what 'regularize' adds to the loss: 'anchor' (KL to the base model's own responses on anchor prompts, "
        "rimguard.actions.anchor), 'activation' (hold the safety neurons' activations on the training batch at their base "
        "values), 'params' (L2-SP pull to the base weights), or a regularizer you registered (rimguard.actions.register)",
        choices=regularizer_names)
    reg_lambda: float | None = option(None, "lambda, the regularizer's weight; none: its default (anchor 1, activation 1, "
                                      "params 10)", ge=0)
    adaptive_lambda: bool = option(False, "scale lambda by the level (x1 at regularize, x2 at freeze, x4 at stop)")
    anchor_every: int = option(4, "optimizer steps between anchor batches; 4 met every prevention target on the benchmark's "
                               "three runs where every step over-refused (benchmarks/RESULTS.md section 1)", ge=1)
    anchor_batch_size: int = option(8, "anchor rows per anchor batch (harmful and harmless look-alikes mixed)", ge=1)
    anchor_act_weight: float = option(0.0, "weight of the anchor's neuron term relative to its KL; 0 by default: on SmolLM2 "
                                      "it added no retention and drove the monitor's RAS and z below zero", ge=0)
    anchor_harmless: bool = option(True, "also anchor harmless look-alike prompts to the base model's own answers, so the "
                                   "anchor does not teach blanket refusal")
    anchor_max_new_tokens: int = option(32, "length of the recorded base responses, tokens", ge=1)
    anchor_top_k: int = option(32, "base log-probs recorded per response token (the rest is one tail bucket)", ge=1)
    param_scope: Literal["all", "safety"] = option("all", "'params' regularizer: all trainable parameters or only the "
                                                   "safety neurons' slices")
    freeze_top_fraction: float = option(0.25, "share of the safety neurons (the most shifted) that freeze_top freezes", gt=0, le=1)
    freeze_share: float | None = option(None, "if set, freeze holds this share of all MLP neurons (highest selection score) "
                                        "instead of the atlas' safety set", gt=0, le=1)



SECTIONS: dict[str, type[_Section]] = {c.NAME: c for c in (AtlasConfig, MonitorConfig, PolicyConfig, ActionsConfig)}
# flat field name -> its section
OWNER: dict[str, str] = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}
assert len(OWNER) == sum(len(fields(c)) for c in SECTIONS.values()), "config field names must be unique across sections"


@dataclass(init=False)
class GuardConfig:
    """How rimguard finds neurons (``atlas``), measures (``monitor``), decides (``policy``) and acts
    (``actions``), plus the ``seed`` of its random draws (control sets, probe subsets).

    Build it from flat keywords, sections, or both (flat keywords win)::

        GuardConfig(mode="regularize", probe_every=10)
        GuardConfig(monitor=MonitorConfig(probe_every=10), policy={"mode": "regularize"})

    Each field's help: :func:`describe`, or ``rimguard demo --help``.
    """

    atlas: AtlasConfig
    monitor: MonitorConfig
    policy: PolicyConfig
    actions: ActionsConfig
    seed: int = 0

    def __init__(self, atlas: AtlasConfig | dict | None = None, monitor: MonitorConfig | dict | None = None,
                 policy: PolicyConfig | dict | None = None, actions: ActionsConfig | dict | None = None, seed: int = 0,
                 **flat: Any) -> None:
        if isinstance(actions, dict) and actions and set(actions) <= set(LEVELS):
            # a flat per-level action map (the field's name before the config had sections)
            flat = {"level_actions": actions, **flat}
            actions = None
        unknown = sorted(set(flat) - set(OWNER))
        if unknown:
            hints = {n: [RENAMED[n]] if n in RENAMED else difflib.get_close_matches(n, OWNER, n=1) for n in unknown}
            said = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
            raise ConfigError(f"GuardConfig: unknown field(s) {said}")
        given = {"atlas": atlas, "monitor": monitor, "policy": policy, "actions": actions}
        for name, cls in SECTIONS.items():
            mine = {k: v for k, v in flat.items() if OWNER[k] == name}
            setattr(self, name, _section(cls, given[name], mine))
        if not _has_type(seed, int):
            raise ConfigError(f"GuardConfig.seed: must be an integer (got {short(seed)})")
        self.seed = seed
        for level, rules in self.policy.thresholds.items():  # a threshold on a metric never measured never fires
            for metric in (m for m in rules if m in _OFF_WHEN):
                name, off, remedy = _OFF_WHEN[metric]
                if getattr(self.monitor, name) == off:
                    raise ConfigError(f"GuardConfig.policy.thresholds: '{level}.{metric}' can never fire: monitor.{name}={off!r} "
                                      f"turns {metric} off ({remedy})")

    @classmethod
    def of(cls, config: "GuardConfig | dict | str | Path | None" = None, **overrides: Any) -> "GuardConfig":
        """A config from a ``GuardConfig``, a dict of its fields, a YAML/JSON path or None (the defaults), with
        ``overrides`` (flat field names) applied."""
        if isinstance(config, (str, Path)):
            config = cls.load(config)
        elif isinstance(config, dict):
            config = cls.from_dict(config)
        elif config is not None and not isinstance(config, cls):
            raise ConfigError(f"GuardConfig: expected a GuardConfig, a dict of its fields or a config file path, got "
                              f"{type(config).__name__} ({short(config)})")
        config = config or cls()
        return config.replace(**overrides) if overrides else config

    def check_heads(self, num_heads: int | None) -> None:
        """Refuse thresholds on refusal-head metrics that can never fire: the atlas has no heads (``num_heads`` 0),
        or, with no atlas yet (None), identification will find none (``atlas.refusal_heads`` 0)."""
        rules = [f"{level}.{m}" for level, r in self.policy.thresholds.items() for m in r if m.startswith("refusal_head")]
        if rules and (num_heads == 0 if num_heads is not None else self.atlas.refusal_heads == 0):
            why = "the atlas has no refusal heads" if num_heads is not None else "atlas.refusal_heads is 0"
            raise ConfigError(f"GuardConfig.policy.thresholds: {rules} can never fire: {why} (identify with refusal_heads >= 1, "
                              "or drop the thresholds)")

    def replace(self, **changes: Any) -> "GuardConfig":
        """A copy with ``changes`` (flat field names or whole sections) applied and validated."""
        sections = {name: getattr(self, name) for name in SECTIONS}
        return GuardConfig(**{**sections, "seed": self.seed, **changes})

    def identify_options(self) -> dict[str, Any]:
        """Keywords of :meth:`rimguard.NeuronAtlas.identify` from the atlas section (its probe count
        aside: the caller slices the prompts), the probe batch size and the seed."""
        options = {f.name: getattr(self.atlas, f.name) for f in fields(self.atlas) if f.name != "num_safety_probes"}
        return {**options, "batch_size": self.monitor.probe_batch_size, "seed": self.seed}

    # -- conversion --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Nested plain data: ``{"atlas": {...}, "monitor": {...}, "policy": {...}, "actions": {...}, "seed": 0}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GuardConfig":
        """From nested (as :meth:`to_dict` writes) or flat field names, or a mix."""
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write as YAML (``.yaml``/``.yml``) or JSON (anything else), nested by section."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            write_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            write_atomic(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "GuardConfig":
        """From a YAML or JSON file: ``.json`` is parsed as JSON, anything else as YAML (a superset of JSON), the
        suffix read case-insensitively."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file (give the .yaml or .json file in it)")
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (a config is YAML or JSON, UTF-8)") from None
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as err:  # noqa: BLE001 - yaml and json raise different types
            raise ConfigError(f"{path}: cannot parse ({str(err)[:200]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of GuardConfig sections or fields")
        return cls.from_dict(data)


# metric -> (the monitor field, its value that turns the metric off, the remedy)
_OFF_WHEN: dict[str, tuple[str, Any, str]] = {
    "kl_task": ("kl_probes", 0, "set kl_probes >= 1 or drop the threshold"),
    "refusal_drop": ("margin_probes", 0, "set margin_probes >= 1 or drop the threshold"),
    "refusal_kl": ("refusal_kl", False, "set refusal_kl: true or drop the threshold"),
    "probe_refusal_drop": ("witness_tokens", 0, "set witness_tokens >= 1 or drop the threshold"),
}


def _section(cls: type[_Section], given: Any, flat: dict[str, Any]) -> _Section:
    if given is None:
        given = {}
    if isinstance(given, cls):
        return replace(given, **flat) if flat else given
    if not isinstance(given, dict):
        raise ConfigError(f"GuardConfig.{cls.NAME}: must be a {cls.__name__} or a mapping of its fields (got {short(given)})")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        renamed = "".join(f"; {n!r} is now {RENAMED[n]!r}" for n in unknown if n in RENAMED)
        raise ConfigError(f"GuardConfig.{cls.NAME}: unknown field(s) {unknown} (fields: {sorted(names)}){renamed}")
    return cls(**{**given, **flat})


# -- the command line ---------------------------------------------------------------------------
def describe(sections: Iterable[str] = tuple(SECTIONS)) -> list[tuple[str, str, Any, str]]:
    """``(section, field, default, help)`` of every field of ``sections``, in definition order."""
    out = []
    for name in sections:
        defaults = SECTIONS[name]()
        out += [(name, f.name, getattr(defaults, f.name), f.metadata["help"]) for f in fields(SECTIONS[name])]
    return out


def _cli_parser(hint: Any):
    """Text -> value for a field of type ``hint`` (``none``/``null`` is None where allowed; mappings
    and lists are YAML/JSON)."""
    args = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    optional = len(args) < len(get_args(hint))
    inner = args[0]

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if inner is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return low in ("true", "1", "yes")
        if inner in (int, float, str):
            return inner(text)
        if get_origin(inner) is Literal:
            return text
        import yaml

        return yaml.safe_load(text)

    parse.__name__ = _type_name(hint)  # argparse names the type in its "invalid ... value" message
    return parse


def add_arguments(parser: argparse.ArgumentParser, sections: Iterable[str] = tuple(SECTIONS), seed: bool = True,
                  defaults: GuardConfig | None = None) -> None:
    """One flag per field of ``sections`` (``--probe-every``), help and choices from the field; the
    help shows the value in ``defaults`` (default: ``GuardConfig()``).

    A flag the user does not pass leaves no attribute on the parsed namespace, so
    :func:`from_arguments` changes only what was passed.
    """
    defaults = defaults or GuardConfig()
    for name in sections:
        group = parser.add_argument_group(f"guard settings: {name}")
        hints = get_type_hints(SECTIONS[name])
        section = getattr(defaults, name)
        for f in fields(SECTIONS[name]):
            hint = hints[f.name]
            choices = get_args(hint) if get_origin(hint) is Literal else f.metadata["choices"]() if "choices" in f.metadata else None
            group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_cli_parser(hint), choices=choices,
                               default=argparse.SUPPRESS, help=f"{f.metadata['help']} [{getattr(section, f.name)}]"
                               .replace("%", "%%"))
    if seed:
        parser.add_argument("--seed", type=int, default=argparse.SUPPRESS, help=f"seed of the guard's random draws [{defaults.seed}]")


def from_arguments(args: argparse.Namespace, base: GuardConfig | None = None) -> GuardConfig:
    """``base`` (default: the defaults) with the config flags that were passed on the command line."""
    base = base or GuardConfig()
    passed = {k: v for k, v in vars(args).items() if k in OWNER or k == "seed"}
    return base.replace(**passed)
