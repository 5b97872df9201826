"""rimguard's main job, on a real model, on a CPU: the same reasoning fine-tune unguarded and guarded, side by side.

1. Get a safety-aligned SmolLM2-135M-Instruct (built once and cached, see ``rimguard.demo.zoo``).
2. Measure it on held-out prompts it never saw during alignment: how often it refuses harmful requests,
   how often it refuses harmless look-alikes (over-refusal), and its loss on unseen word problems.
3. Fine-tune it on harmless, generated arithmetic reasoning (TRL ``SFTTrainer``, full fine-tune, a learning
   rate high enough that safety erodes within the run) twice from the same weights: unguarded (the guard only
   watches: ``mode="monitor"``, so its alarm shows) and guarded (``--mode``, by default ``regularize``: the
   safety anchor), printing the guard's metrics as they are logged.
4. Measure both again, print the two runs side by side and plot them (refusal curves beside the signals).

    python examples/demo.py                      # unguarded vs mode=regularize
    python examples/demo.py --mode escalate      # unguarded vs warn, regularize, then freeze as risk rises
    python examples/demo.py --mode monitor       # the unguarded run only

The guard's probes are the bundled prompts used in alignment; the evaluation's held-out prompts are the others,
so what the guard measures and what the demo judges are disjoint (the anchor trains on a third set).

Outputs in ``--out``: per run a folder (``unguarded/``, ``regularize/``: ``rimguard.jsonl``, the guard's event
log), the safety neurons (``unguarded/rimguard_atlas/``, identified once and used by both runs),
``summary.json`` (every number and every held-out completion) and ``rimguard_demo.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers import logging as hf_logging
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.config import LEVELS, add_arguments, from_arguments
from rimguard.demo.evaluation import completion_examples, heldout_loss, judged
from rimguard.demo.zoo import EVAL_MAX_NEW_TOKENS, aligned_smollm2, alignment_split, harmless_split
from rimguard.events import live_events, read_events
from rimguard.files import write_atomic
from rimguard.passes import pad_id
from rimguard.probes.reasoning import reasoning_texts
from rimguard.report import Arm, plot_comparison
from rimguard.state import ATLAS_DIR

COLUMNS = ("step", "safety_drop", "probe_refusal", "refusal_kl", "anchor_kl", "level", "frozen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rimguard demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="reasoning SFT optimizer steps (per run)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (a sub-folder per run)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache; unset: $RIMGUARD_CACHE or ~/.cache/rimguard")
    p.add_argument("--model", type=Path, default=None,
                   help="folder of a causal LM and its tokenizer to guard instead of the aligned SmolLM2 (e.g. your own)")
    p.add_argument("--lr", type=float, default=2e-4, help="reasoning SFT learning rate")
    p.add_argument("--batch-size", type=int, default=4, help="reasoning SFT batch size")
    p.add_argument("--warmup", type=int, default=3, help="learning-rate warmup steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; unset: torch's choice")
    p.add_argument("--config", type=Path, default=None,
                   help="GuardConfig YAML/JSON (instead of the demo's guard settings); the guard flags below override "
                        "only the settings you pass")
    add_arguments(p, defaults=DEMO_CONFIG)
    return p.parse_args(argv)


# The demo's guard: the safety anchor; a check every 8 steps (plus steps 1, 2, 4) on 8 harmful probes, short responses.
DEMO_CONFIG = GuardConfig(mode="regularize", probe_every=8, num_safety_probes=8, max_new_tokens=16, kl_probes=4, max_length=192)
UNGUARDED = "unguarded"  # the run in which the guard only watches (mode=monitor)
EVAL_BATCH = 12  # held-out prompts per generation batch: 24 prompts in two


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """The demo's guard settings (or ``--config``'s), then the guard flags the user passed."""
    return from_arguments(args, GuardConfig.load(args.config) if args.config else DEMO_CONFIG)


class LiveTable(TrainerCallback):
    """Prints one row per guard check (the ``rimguard/*`` logs) under a step progress bar.

    Add it after the guard: the guard logs its metrics through ``Trainer.log`` at each check.
    It also keeps the training losses for the plot.
    """

    def __init__(self, name: str = "reasoning SFT") -> None:
        self.name = name
        self.bar: tqdm | None = None
        self.losses: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.name, unit="step", leave=False)
        self.bar.write(" ".join(f"{c:>14}" if i else f"{c:>5}" for i, c in enumerate(COLUMNS)))

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))
        guard = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("rimguard/")}
        if not guard or self.bar is None:
            return
        row = [f"{state.global_step:>5}"]
        for name in COLUMNS[1:]:
            value = guard.get(name, math.nan)
            if name == "level":
                row.append(f"{LEVELS[int(value)]:>14}")
            elif name == "frozen":
                row.append(f"{int(value):>14d}")
            else:
                row.append(f"{value:>14.4g}")
        self.bar.write(" ".join(row))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class TqdmHandler(logging.Handler):
    """Prints the guard's warnings through ``tqdm.write`` (so they do not break the progress bar),
    each threshold crossing only the first time it happens."""

    CROSSING = re.compile(r"rimguard: (\w+)=\S+ crossed the '(\w+)' threshold")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        crossing = self.CROSSING.match(message)
        if crossing:
            if crossing.groups() in self.seen:
                return
            self.seen.add(crossing.groups())
        tqdm.write(f"      ! {message}")


class HeldOut:
    """The demo's evaluation: prompts and word problems the model never saw in alignment or fine-tuning, and
    disjoint from the guard's probes (which are the alignment prompts, see :func:`guard_prompts`)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.harmful, self.harmless = alignment_split()[1], harmless_split()[1]
        problems = reasoning_texts(16, seed=1_000)  # the fine-tune draws seed 0
        self.problems = completion_examples(tokenizer, problems, 192)

    def measure(self, model, label: str) -> dict:
        """Refusal of the held-out harmful prompts, over-refusal of the harmless ones (each with its Wilson
        interval, count, degenerate outputs and every completion), and the mean loss on the held-out problems (nats)."""
        harmful = judged(model, self.tokenizer, self.harmful, EVAL_MAX_NEW_TOKENS, EVAL_BATCH, keep=len(self.harmful), desc=f"{label}: harmful")
        harmless = judged(model, self.tokenizer, self.harmless, EVAL_MAX_NEW_TOKENS, EVAL_BATCH, keep=len(self.harmless),
                          desc=f"{label}: harmless")
        return {"refusal": harmful, "over_refusal": harmless, "task_loss": heldout_loss(model, self.problems, pad_id(self.tokenizer))}


def guard_prompts() -> dict[str, list[str]]:
    """The guard's harmful and harmless probes: the bundled prompts that alignment trained on, never the held-out ones."""
    return {"safety_prompts": alignment_split()[0], "harmless_prompts": harmless_split()[0]}


def fine_tune(folder: Path, tokenizer, config: GuardConfig, args: argparse.Namespace, out: Path, name: str,
              atlas: Path | None) -> tuple[torch.nn.Module, RIMGuard, LiveTable, float]:
    """One guarded reasoning SFT of the model in ``folder``: (trained model, guard, table of its logs, seconds)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    table = LiveTable(name)
    # TRL's SFTConfig turns activation checkpointing on by default; a 135M model does not need it.
    sft = SFTConfig(
        **no_checkpointing(), output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup, logging_steps=1, max_length=192,
        report_to=[], save_strategy="no", save_only_model=True, use_cpu=True, bf16=False, fp16=False, seed=0,
        disable_tqdm=True,  # the guard's 'checkpoint' action (mode=escalate) still saves; save_only_model keeps it small
    )
    trainer = SFTTrainer(model=model, args=sft, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(reasoning_texts(args.steps * args.batch_size)))
    # attached: its metrics go through Trainer.log, where the table reads them
    guard = RIMGuard.attach(trainer, config, atlas=atlas, **guard_prompts())
    trainer.add_callback(table)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    found = "the safety neurons of the first run" if atlas else "the guard first finds the safety neurons"
    print(f"\n{name}: reasoning SFT, {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, mode={config.policy.mode} ({found})")
    start = time.time()
    trainer.train()
    return trainer.model, guard, table, time.time() - start


def alarm(guard: RIMGuard) -> dict:
    """The guard's alarm over a run: the first step at each level above ``ok``, and the peak level."""
    first: dict[str, int] = {}
    for record in guard.history:
        for level in LEVELS[1 : int(record["level"]) + 1]:
            first.setdefault(level, record["step"])
    return {"peak": LEVELS[int(max((h["level"] for h in guard.history), default=0))], "first_step": first}


def _pct(result: dict) -> str:
    return f"{result['refusal_rate']:.0%} ({result['refusal']}/{result['n']})"


def side_by_side(before: dict, runs: dict[str, dict]) -> str:
    """The runs' numbers as a text table, the aligned model first."""
    rows = [("", "aligned model", *runs)]
    rows.append(("held-out harmful refused", _pct(before["refusal"]), *(_pct(r["after"]["refusal"]) for r in runs.values())))
    rows.append(("  degenerate outputs", str(before["refusal"]["garbage"]), *(str(r["after"]["refusal"]["garbage"]) for r in runs.values())))
    rows.append(("held-out harmless refused", _pct(before["over_refusal"]), *(_pct(r["after"]["over_refusal"]) for r in runs.values())))
    rows.append(("held-out task loss (nats)", f"{before['task_loss']:.3f}", *(f"{r['after']['task_loss']:.3f}" for r in runs.values())))
    rows.append(("task-loss gain vs unguarded", "", *(f"{r['gain_share']:.0%}" if r["gain_share"] == r["gain_share"] else "-"
                                                      for r in runs.values())))
    rows.append(("guard's alarm (first warn)", "", *(f"step {r['alarm']['first_step']['warn']}" if "warn" in r["alarm"]["first_step"]
                                                     else "none" for r in runs.values())))
    rows.append(("action at the end", "", *(r["action"] for r in runs.values())))
    rows.append(("fine-tune time", "", *(f"{r['seconds']:.0f} s" for r in runs.values())))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    guard_log = logging.getLogger("rimguard")
    guard_log.addHandler(TqdmHandler())
    guard_log.setLevel(logging.WARNING)
    guard_log.propagate = False
    config = guard_config(args)
    plans = {UNGUARDED: config.replace(mode="monitor")}
    if config.policy.mode != "monitor":
        plans[config.policy.mode] = config
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # 1. the aligned model (built on first use, several minutes; then cached), or the user's
    if args.model is not None and not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"{args.model}: not a model folder (no config.json)")
    folder = args.model or aligned_smollm2(args.cache_dir)
    recipe_file = folder / "recipe.json"
    recipe = json.loads(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ready = time.time()

    # 2. the held-out measurements, before
    heldout = HeldOut(tokenizer)
    before = heldout.measure(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32), "before")
    print(f"{folder.name} refuses {_pct(before['refusal'])} of held-out harmful requests and "
          f"{_pct(before['over_refusal'])} of held-out harmless ones before reasoning SFT")

    # 3. the same reasoning SFT, unguarded and guarded, from the same weights; one atlas for both
    runs: dict[str, dict] = {}
    arms: list[Arm] = []
    atlas = None
    for name, plan in plans.items():
        model, guard, table, seconds = fine_tune(folder, tokenizer, plan, args, args.out / name, name, atlas)
        atlas = atlas or args.out / name / ATLAS_DIR
        after = heldout.measure(model, name)
        events = ([e for e in live_events(read_events(args.out / name / plan.monitor.log_file)) if e.get("run_id") == guard.engine.run_id]
                  if plan.monitor.log_file else guard.history)
        runs[name] = {"mode": plan.policy.mode, "after": after, "alarm": alarm(guard),
                      "action": guard.action, "frozen": int(guard.engine.freezer.count) if guard.engine.freezer else 0,
                      "num_safety_neurons": guard.atlas.num_safety, "history": guard.history, "losses": table.losses,
                      "seconds": round(seconds, 1)}
        arms.append(Arm(name, events, table.losses, [(0, before["refusal"]), (args.steps, after["refusal"])]))
        del model, guard
    gain = {name: before["task_loss"] - r["after"]["task_loss"] for name, r in runs.items()}
    for name, r in runs.items():
        r["gain_share"] = gain[name] / gain[UNGUARDED] if gain[UNGUARDED] > 0 else math.nan

    # 4. side by side: summary, plot, table
    summary = {
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "model": str(folder),
        "alignment": recipe.get("measured", {}) | {"recipe": recipe.get("recipe")},
        "heldout": {"harmful": len(heldout.harmful), "harmless": len(heldout.harmless), "problems": len(heldout.problems)},
        "before": before, "runs": runs,
        "seconds": {"model_ready": round(ready - start, 1), "total": round(time.time() - start, 1)},
    }
    write_atomic(args.out / "summary.json", json.dumps(summary, indent=2))
    title = (f"rimguard demo ({folder.name}): the same reasoning SFT ({args.steps} steps, lr {args.lr:g}), "
             + " vs ".join(f"{n} (held-out refusal {before['refusal']['refusal_rate']:.0%} -> {r['after']['refusal']['refusal_rate']:.0%})"
                           for n, r in runs.items()))
    plot_comparison(arms, args.out / "rimguard_demo.png", config.policy.thresholds, title=title)

    print()
    print(side_by_side(before, runs))
    print(f"held-out sets: {len(heldout.harmful)} harmful and {len(heldout.harmless)} harmless prompts (string judge: read the "
          f"completions in summary.json), {len(heldout.problems)} word problems; guard: {runs[UNGUARDED]['num_safety_neurons']} "
          "safety neurons")
    print(f"time: model ready {summary['seconds']['model_ready']:.0f}s, total {summary['seconds']['total']:.0f}s")
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'rimguard_demo.png'}, "
          + ", ".join(str(args.out / n / "rimguard.jsonl") for n in runs))
    return summary


if __name__ == "__main__":
    main()
