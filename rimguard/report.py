"""Plots and a Markdown summary from a guard's JSONL log (``rimguard report RUN_DIR``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, NamedTuple

from rimguard.config import LEVELS
from rimguard.events import live_events, read_events, runs_of
from rimguard.files import write_atomic


class Panel(NamedTuple):
    """One plot panel: a logged metric and how it is drawn."""

    key: str
    title: str
    control: str | None = None  # the control-set metric drawn beside it (grey, dotted)
    steps: bool = False  # a state held between checks (level, lambda, count): drawn as steps
    only_nonzero: bool = False  # an action's quantity: shown only when it is non-zero somewhere
    from_zero: bool = False  # a non-negative quantity: the axis starts at 0
    meaning: str = ""  # one line under the title, in words


PANELS = (
    Panel("safety_drop", "safety-neuron activation drop (the alarm)", meaning="the safety neurons' activation loss on harmful probes"),
    Panel("ras_safe", "RAS on safety neurons", "ras_control_mean", meaning="the paper's score; grey: random control sets"),
    Panel("entanglement_z", "entanglement z (vs control sets)", meaning="RAS of the safety neurons in control-set SDs"),
    Panel("refusal_margin", "refusal vs compliance log-odds (nats)", meaning="how much more likely a refusal opening is"),
    Panel("kl_task", "KL(pi_0 || pi_t) on task probes", meaning="how far the model moved on task (reasoning) prompts"),
    Panel("refusal_head_shift", "refusal heads: attention on the reasoning", meaning="rise of their attention share on a "
          "reasoning passage since train start"),
    Panel("router_share", "MoE: routing share to safety experts", "router_share_train",
          meaning="share of routing slots sent to experts holding safety neurons; grey: on training batches"),
    Panel("level", "risk level (what the signals say)", steps=True),
    Panel("reg_lambda", "regularizer lambda in force", steps=True, only_nonzero=True, from_zero=True),
    Panel("anchor_kl", "safety-anchor KL (base responses)", only_nonzero=True, from_zero=True,
          meaning="drift from the base model's own replies"),
    Panel("activation_penalty", "activation penalty", only_nonzero=True, from_zero=True),
    Panel("frozen", "frozen neurons", steps=True, only_nonzero=True, from_zero=True),
)


def panels_for(metrics: list[dict[str, Any]]) -> list[Panel]:
    """The panels a run's metric records call for: every logged signal, and each action's quantity
    only where it is non-zero somewhere."""
    return [p for p in PANELS if any(m.get(p.key) for m in metrics) or not p.only_nonzero and any(p.key in m for m in metrics)]


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(events: list[dict[str, Any]], path: str | Path, thresholds: dict[str, dict[str, float]] | None = None,
             losses: list[tuple[int, float]] | None = None, title: str | None = None) -> Path:
    """Write a PNG with one panel per metric: thresholds dashed, level changes and freezes marked.

    ``losses``: ``(step, training loss)`` pairs for an extra panel (the log does not hold them);
    ``title``: a line above the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = [e for e in events if e.get("event") == "metrics"]
    changes = [e for e in events if e.get("event") == "level"]
    freezes = [e for e in events if e.get("event") == "freeze"]
    panels = panels_for(metrics)
    cols = 3
    rows = (len(panels) + bool(losses) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.3 * rows), sharex=True, squeeze=False)
    for ax, (key, name, control, steps_drawn, _, from_zero, meaning) in zip(axes.flat, panels):
        steps, values = _series(metrics, key)
        if steps_drawn:
            ax.step(steps, values, where="post", marker="o", ms=3, label=key)
        else:
            ax.plot(steps, values, marker="o", ms=3, label=key)
        if control:
            cs, cv = _series(metrics, control)
            ax.plot(cs, cv, color="grey", ls=":", label="control sets (mean)")
        for level, rules in (thresholds or {}).items():
            if key in rules:
                ax.axhline(rules[key], ls="--", lw=0.8, color="C3", alpha=0.4 + 0.15 * LEVELS.index(level))
                ax.text(ax.get_xlim()[0], rules[key], f" {level}", fontsize=7, color="C3", va="bottom")
        for change in changes:
            ax.axvline(change["step"], color="C1", lw=0.8, alpha=0.7)
        for freeze in freezes:
            ax.axvline(freeze["step"], color="C2", lw=1.2, ls="-.", alpha=0.7)
        if key == "level":
            ax.set_yticks(range(len(LEVELS)), LEVELS)
        elif key == "frozen":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        else:
            ax.ticklabel_format(axis="y", useOffset=False)  # margins near 21.5 nats read as values, not offsets
        if from_zero:
            ax.set_ylim(bottom=0, top=max(max(values, default=0) * 1.15, 1e-12))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name + (f"\n{meaning}" if meaning else ""), fontsize=9)
        ax.grid(alpha=0.3)
        if control:
            ax.legend(fontsize=7)
    used = len(panels)
    if losses:
        ax = axes.flat[used]
        ax.plot(*zip(*losses), ".-", color="tab:green")
        ax.set_yscale("log")
        ax.set_title("training loss", fontsize=9)
        ax.grid(alpha=0.3)
        used += 1
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    for ax in list(axes.flat)[:used]:
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in list(axes.flat)[max(0, used - cols): used]:
        ax.set_xlabel("optimizer step")
    legend = "orange lines = level changes, green dash-dot = freezes, red dashed = thresholds"
    fig.suptitle(f"{title}\n{legend}" if title else f"rimguard: {legend}", fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    plt.close(fig)
    return write_atomic(path, image.getvalue())


class Arm(NamedTuple):
    """One run of a side-by-side comparison (:func:`plot_comparison`)."""

    label: str
    events: list[dict[str, Any]]  # the run's guard log (metrics records carry ``probe_refusal`` and the signals)
    losses: list[tuple[int, float]]  # (step, training loss)
    refusals: list[tuple[int, dict[str, Any]]]  # (step, judged held-out refusal: refusal_rate, refusal_lo/hi, n)


def plot_comparison(arms: list[Arm], path: str | Path, thresholds: dict[str, dict[str, float]] | None = None,
                    title: str | None = None) -> Path:
    """Write a PNG of runs side by side: refusal (held-out evaluations as points with their 95% intervals, the
    guard's own probe refusal at each check as a line with its band), the alarm's signal with its thresholds,
    the training loss, and the risk level; one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    refusal, signal, loss, level = axes
    for n, arm in enumerate(arms):
        color = f"C{n}"
        metrics = [e for e in arm.events if e.get("event") == "metrics"]
        steps, share = _series(metrics, "probe_refusal")
        if steps:
            lo, hi = _series(metrics, "probe_refusal_lo")[1], _series(metrics, "probe_refusal_hi")[1]
            probes = int(metrics[-1].get("probe_refusal_n") or 0)
            refusal.plot(steps, share, color=color, lw=1, ls="--", label=f"{arm.label}: guard's probes (n={probes})")
            if len(lo) == len(steps) == len(hi):
                refusal.fill_between(steps, lo, hi, color=color, alpha=0.12, lw=0)
        points = [(s, r["refusal_rate"], r["refusal_lo"], r["refusal_hi"], r["n"]) for s, r in arm.refusals]
        if points:
            xs, ys, los, his, counts = zip(*points)
            refusal.errorbar(xs, ys, yerr=[[y - l for y, l in zip(ys, los)], [h - y for y, h in zip(ys, his)]], color=color,
                             marker="o", ms=6, lw=2, capsize=4, label=f"{arm.label}: held-out (n={counts[-1]})")
        steps, values = _series(metrics, "safety_drop")
        signal.plot(steps, values, marker="o", ms=3, color=color, label=arm.label)
        if arm.losses:
            loss.plot(*zip(*arm.losses), ".-", ms=3, color=color, label=arm.label)
        steps, values = _series(metrics, "level")
        level.step(steps, values, where="post", marker="o", ms=3, color=color, label=arm.label)
    for name, rules in (thresholds or {}).items():
        if "safety_drop" in rules:
            signal.axhline(rules["safety_drop"], ls="--", lw=0.8, color="C3", alpha=0.4 + 0.15 * LEVELS.index(name))
            signal.text(0, rules["safety_drop"], f" {name}", fontsize=7, color="C3", va="bottom")
    refusal.set_ylim(-0.02, 1.05)
    refusal.set_title("refusal of harmful requests\n(points: held-out evaluation; dashed: the guard's probes)", fontsize=9)
    signal.set_title("safety_drop (the alarm's signal)\nred dashed: thresholds", fontsize=9)
    loss.set_title("training loss", fontsize=9)
    level.set_yticks(range(len(LEVELS)), LEVELS)
    level.set_title("risk level (what the signals say)", fontsize=9)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=110, format="png")
    plt.close(fig)
    return write_atomic(path, image.getvalue())


def summarize(events: list[dict[str, Any]]) -> str:
    """A short Markdown summary: the run's span, final metrics, level changes and freezes."""
    metrics = [e for e in events if e.get("event") == "metrics"]
    start = next((e for e in events if e.get("event") == "start"), {})
    lines = ["# rimguard run report", ""]
    if start:
        lines.append(f"- mode: `{start.get('mode')}`, safety neurons: {start.get('num_safety')}")
        if start.get("atlas"):
            lines += ["", "| atlas setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in start["atlas"].items()] + [""]
    if metrics:
        first, last = metrics[0], metrics[-1]
        lines.append(f"- checks: {len(metrics)} (steps {first['step']} to {last['step']})")
        peak = max(int(m.get("level") or 0) for m in metrics)
        lines.append(f"- risk level (what the signals say): highest `{LEVELS[peak]}`, last `{LEVELS[int(last.get('level') or 0)]}`; "
                     f"action in force at the end (what the guard did): {last.get('action', 'not logged')}")
        lines += ["", "| metric | first | last | max |", "|---|---|---|---|"]
        for key in ("safety_drop", "ras_safe", "ras_control_mean", "entanglement_z", "refusal_drop", "kl_task", "refusal_head_shift",
                    "anchor_kl", "activation_penalty", "frozen"):
            vals = [m[key] for m in metrics if m.get(key) is not None]
            if vals:
                lines.append(f"| {key} | {vals[0]:.4g} | {vals[-1]:.4g} | {max(vals):.4g} |")
    changes = [e for e in events if e.get("event") in ("level", "freeze", "stop")]
    lines += ["", "## Events", ""]
    for e in changes:
        if e["event"] == "level":
            highest: dict[str, dict] = {}  # one line per metric: the highest threshold it crossed
            for c in e.get("crossings", []):
                if c["metric"] not in highest or c["threshold"] > highest[c["metric"]]["threshold"]:
                    highest[c["metric"]] = c
            why = ", ".join(f"{c['metric']}={c['value']:.3g} >= {c['level']} {c['threshold']:.3g}" for c in highest.values())
            lines.append(f"- step {e['step']}: level {e['from']} -> {e['to']} ({why or 'thresholds released'})")
        elif e["event"] == "freeze":
            lines.append(f"- step {e['step']}: froze {e['added']} neurons ({e['which']}), {e['frozen']} in all")
        else:
            lines.append(f"- step {e['step']}: training stopped at level {e['level']}")
    if not changes:
        lines.append("- none: no threshold was crossed")
    return "\n".join(lines) + "\n"


def check_events(events: list[Any], where: str | Path) -> None:
    """Raise ``ValueError`` naming the record and field if a log record cannot be reported: not an
    object, no integer ``step``, a non-numeric metric, or an unknown level."""
    numeric = {p.key for p in PANELS} | {p.control for p in PANELS if p.control} | {"refusal_drop", "task_rise", "router_share_drop"}
    for n, e in enumerate(events, 1):
        def bad(what: str) -> None:
            raise ValueError(f"{where}: record {n} ({e.get('event', '?') if isinstance(e, dict) else '?'}): {what}")

        if not isinstance(e, dict):
            bad(f"expected a JSON object, found {type(e).__name__}")
        if not isinstance(e.get("step"), int) or isinstance(e.get("step"), bool):
            bad(f"'step' must be an integer, found {e.get('step')!r}")
        if e.get("event") == "metrics":
            for key in numeric & set(e):
                value = e[key]
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    bad(f"'{key}' must be a number, found {value!r}")
            level = e.get("level")
            if level is not None and level not in range(len(LEVELS)):
                bad(f"'level' must be a level index 0..{len(LEVELS) - 1}, found {level!r}")
        if e.get("event") == "level":
            for key in ("from", "to"):
                if e.get(key) not in LEVELS:
                    bad(f"'{key}' must be one of {LEVELS}, found {e.get(key)!r}")
            crossings = e.get("crossings", [])
            if not isinstance(crossings, list) or not all(isinstance(c, dict) and {"metric", "value", "level", "threshold"} <= set(c)
                                                          for c in crossings):
                bad("'crossings' must be a list of objects with metric, value, level and threshold")
        if e.get("event") == "freeze" and not {"added", "which", "frozen"} <= set(e):
            bad("a freeze record needs 'added', 'which' and 'frozen'")
        thresholds = e.get("thresholds") if e.get("event") == "start" else None
        if thresholds is not None and not (isinstance(thresholds, dict) and all(isinstance(r, dict) for r in thresholds.values())):
            bad("'thresholds' must map each level to {metric: value}")


def write_report(run_dir: str | Path, log_file: str = "rimguard.jsonl", run: str | None = None) -> tuple[Path, Path]:
    """Read ``run_dir/log_file``; write ``rimguard_report.png`` and ``rimguard_report.md`` beside it.

    A log can hold several runs (each record has a ``run_id``): the last run is reported unless
    ``run`` names another (a run id or its unique prefix).
    """
    run_dir = Path(run_dir)
    log = run_dir / log_file
    if not log.is_file():
        raise FileNotFoundError(f"{log}: no rimguard log here (is this a run's output_dir?)")
    events = read_events(log)
    if not events:
        raise ValueError(f"{log}: is empty (the run has logged nothing yet)")
    check_events(events, log)
    events = live_events(events)  # a resumed run: its live attempt
    ids = runs_of(events)
    with_metrics = [r for r in ids if any(e.get("event") == "metrics" and e.get("run_id", "") == r for e in events)]
    chosen = [r for r in ids if r.startswith(run)] if run is not None else with_metrics[-1:] or ids[-1:]
    if len(chosen) != 1:
        raise ValueError(f"{log}: run {run!r} matches {len(chosen)} of the runs {ids}")
    events = [e for e in events if e.get("run_id", "") == chosen[0]]
    if not any(e.get("event") == "metrics" for e in events):
        raise ValueError(f"{log}: holds no metrics yet")
    thresholds = next((e.get("thresholds") for e in events if e.get("event") == "start"), None)
    png = plot_run(events, run_dir / "rimguard_report.png", thresholds)
    md = run_dir / "rimguard_report.md"
    write_atomic(md, summarize(events))
    return png, md
