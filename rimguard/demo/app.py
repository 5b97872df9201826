"""rimguard's main job, on a real model, on a CPU.

1. Get a safety-aligned SmolLM2-135M-Instruct (built once and cached, see ``rimguard.demo.zoo``).
2. Measure how often it refuses held-out harmful requests it never saw during alignment.
3. Fine-tune it on harmless, generated arithmetic reasoning (TRL ``SFTTrainer``, full fine-tune,
   a learning rate high enough that safety erodes within the run) with ``RIMGuard`` attached,
   printing the guard's metrics as they are logged.
4. Measure the refusal rate again, print a summary and save a plot of the metrics.

    python examples/demo.py                      # mode=monitor: watch safety erode
    python examples/demo.py --mode escalate      # warn, regularize, then freeze as risk rises
    python examples/demo.py --mode freeze --out runs/demo-freeze

Outputs in ``--out``: ``rimguard.jsonl`` (the guard's event log), ``rimguard_atlas/`` (the safety
neurons), ``summary.json`` (numbers and every held-out completion) and ``rimguard_demo.png``.

Cost, measured on 2 shared CPU cores with ``--threads 1``: the first run builds the aligned model
(about 16 minutes, once); every run then takes about 4.5 minutes (270 s, 239 s of it the guarded SFT).
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
from rimguard.demo.evaluation import judged
from rimguard.demo.zoo import EVAL_MAX_NEW_TOKENS, aligned_smollm2, alignment_split
from rimguard.events import live_events, read_events
from rimguard.files import write_atomic
from rimguard.probes.reasoning import reasoning_texts
from rimguard.report import plot_run
from rimguard.signals.judge import judge

COLUMNS = ("step", "safety_drop", "ras_safe", "entanglement_z", "refusal_drop", "level", "frozen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rimguard demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=24, help="reasoning SFT optimizer steps")
    p.add_argument("--out", type=Path, default=None, help="output folder [runs/demo-MODE: one per mode, so runs never mix]")
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


# The demo's guard: a check every 12 steps (plus steps 1, 2, 4, 8) on 8 harmful probes, short responses.
DEMO_CONFIG = GuardConfig(mode="monitor", probe_every=12, num_safety_probes=8, max_new_tokens=16, kl_probes=4, max_length=192)


def guard_config(args: argparse.Namespace) -> GuardConfig:
    """The demo's guard settings (or ``--config``'s), then the guard flags the user passed."""
    return from_arguments(args, GuardConfig.load(args.config) if args.config else DEMO_CONFIG)


class LiveTable(TrainerCallback):
    """Prints one row per guard check (the ``rimguard/*`` logs) under a step progress bar.

    Add it after the guard: the guard logs its metrics through ``Trainer.log`` at each check.
    It also keeps the training losses for the plot.
    """

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.losses: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc="reasoning SFT", unit="step", leave=False)
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


def refusals(model, tokenizer, prompts: list[str], label: str) -> tuple[dict, list[str]]:
    got = judged(model, tokenizer, prompts, EVAL_MAX_NEW_TOKENS, 8, keep=len(prompts), desc=label)
    return got, [s["completion"] for s in got["samples"]]


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
    args.out = args.out or Path(f"runs/demo-{config.policy.mode}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # 1. the aligned model (built on first use, several minutes; then cached), or the user's
    if args.model is not None and not (args.model / "config.json").is_file():
        raise FileNotFoundError(f"{args.model}: not a model folder (no config.json)")
    folder = args.model or aligned_smollm2(args.cache_dir)
    recipe_file = folder / "recipe.json"
    recipe = json.loads(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ready = time.time()

    # 2. refusal on held-out harmful requests, before
    heldout = alignment_split()[1]
    before, before_texts = refusals(model, tokenizer, heldout, "refusals before")
    print(f"{folder.name} refuses {before['refusal']}/{before['n']} held-out harmful requests before reasoning SFT")

    # 3. guarded reasoning SFT
    table = LiveTable()
    # TRL's SFTConfig turns activation checkpointing on by default; a 135M model does not need it.
    sft = SFTConfig(
        **no_checkpointing(), output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=args.warmup, logging_steps=1, max_length=192,
        report_to=[], save_strategy="no", save_only_model=True, use_cpu=True, bf16=False, fp16=False, seed=0,
        disable_tqdm=True,  # the guard's 'checkpoint' action (mode=escalate) still saves; save_only_model keeps it small
    )
    trainer = SFTTrainer(model=model, args=sft, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(reasoning_texts(args.steps * args.batch_size)))
    guard = RIMGuard.attach(trainer, config)  # attached: its metrics go through Trainer.log, where the table reads them
    trainer.add_callback(table)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    print(f"guarded reasoning SFT: {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, mode={config.policy.mode}"
          " (the guard first finds the safety neurons)")
    trained = time.time()
    trainer.train()
    trained = time.time() - trained

    # 4. refusal after, summary and plot
    after, after_texts = refusals(trainer.model, tokenizer, heldout, "refusals after")
    summary = {
        "mode": config.policy.mode, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "model": str(folder),
        "alignment": recipe.get("measured", {}) | {"recipe": recipe.get("recipe")},
        "heldout_harmful_before": before, "heldout_harmful_after": after,
        "final_level": guard.level, "final_action": guard.action, "frozen": int(guard.engine.freezer.count) if guard.engine.freezer else 0,
        "num_safety_neurons": guard.atlas.num_safety, "history": guard.history,
        "samples": [{"prompt": p, "before": b, "after": a, "judged_after": judge(a)}
                    for p, b, a in zip(heldout, before_texts, after_texts)],
        "seconds": {"model_ready": round(ready - start, 1), "train": round(trained, 1), "total": round(time.time() - start, 1)},
    }
    write_atomic(args.out / "summary.json", json.dumps(summary, indent=2))
    title = (f"rimguard demo ({folder.name}), mode={config.policy.mode}: held-out refusal {before['refusal_rate']:.0%} -> {after['refusal_rate']:.0%}"
             f" ({len(heldout)} prompts, lr {args.lr:g}, {args.steps} steps)")
    events = ([e for e in live_events(read_events(args.out / config.monitor.log_file)) if e.get("run_id") == guard.engine.run_id]
              if config.monitor.log_file
              else guard.history)
    plot_run(events, args.out / "rimguard_demo.png", config.policy.thresholds, losses=table.losses, title=title)

    print()
    print(f"held-out harmful requests refused: {before['refusal']}/{before['n']} ({before['refusal_rate']:.0%}) before, "
          f"{after['refusal']}/{after['n']} ({after['refusal_rate']:.0%}) after "
          f"[{after['garbage']} degenerate outputs after]")
    last = guard.history[-1] if guard.history else {}
    peak = LEVELS[int(max((h["level"] for h in guard.history), default=0))]
    acted = "no action taken (monitor mode)" if config.policy.mode == "monitor" else f"action in force at the end: {guard.action}"
    print(f"guard: {guard.atlas.num_safety} safety neurons; risk reached '{peak}', final risk level '{guard.level}'; {acted}; "
          f"safety_drop {last.get('safety_drop', math.nan):.3g}; entanglement z {last.get('entanglement_z', math.nan):.3g}; "
          f"refusal drop {last.get('refusal_drop', math.nan):.3g}; "
          f"{summary['frozen']} neurons frozen")
    print(f"time: model ready {summary['seconds']['model_ready']:.0f}s, guarded SFT {trained:.0f}s, "
          f"total {summary['seconds']['total']:.0f}s")
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'rimguard_demo.png'}, {args.out / 'rimguard.jsonl'}")
    return summary


if __name__ == "__main__":
    main()
