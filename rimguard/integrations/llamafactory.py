"""rimguard in LLaMA-Factory: its ``run_exp`` with the guard among the trainer's callbacks.

    python -m rimguard.integrations.llamafactory train.yaml    # a LLaMA-Factory YAML with a ``rimguard:`` section

or, in your own script::

    from llamafactory.train.tuner import run_exp
    from rimguard import GuardConfig, RIMGuard

    run_exp(args, callbacks=[RIMGuard(GuardConfig(mode="regularize"))])   # args: the YAML's keys, as a dict

LLaMA-Factory's YAML keys cannot name a callback, so :func:`train` takes the ``rimguard:`` section (the
:class:`GuardConfig` fields, flat or by section) out of the file, validates it before anything loads, and
hands the rest to ``run_exp`` unchanged. The guard does not see LLaMA-Factory's trainer object, so its metrics
go to ``output_dir/rimguard.jsonl`` (``rimguard report OUTPUT_DIR`` plots them), not through ``Trainer.log``.
Tested with LLaMA-Factory 0.9.5 (``tests/test_frameworks.py``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import yaml
from transformers import TrainerCallback

from rimguard.callback import RIMGuard
from rimguard.config import ConfigError, GuardConfig


def split_args(args: dict[str, Any] | str | Path) -> tuple[dict[str, Any], GuardConfig]:
    """A LLaMA-Factory config (a dict of its YAML keys, or the YAML file) without its ``rimguard`` key, and the
    guard's config from that key (absent: the defaults)."""
    if not isinstance(args, dict):
        path = Path(args)
        if not path.is_file():
            raise ConfigError(f"{path}: no such LLaMA-Factory config file")
        args = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(args, dict):
            raise ConfigError(f"{path}: top level must be a mapping of LLaMA-Factory keys")
    rest = dict(args)
    return rest, GuardConfig.of(rest.pop("rimguard", None) or {})


def train(args: dict[str, Any] | str | Path, callbacks: Sequence[TrainerCallback] = ()) -> RIMGuard:
    """Run LLaMA-Factory's ``run_exp`` on ``args`` (see :func:`split_args`) with a guard, and return the guard
    (its :attr:`~RIMGuard.history`, :attr:`~RIMGuard.level`, :attr:`~RIMGuard.action`)."""
    from llamafactory.train.tuner import run_exp

    rest, config = split_args(args)
    guard = RIMGuard(config)
    run_exp(rest, callbacks=[guard, *callbacks])  # a fresh list: run_exp appends its own callbacks to it
    return guard


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rimguard.integrations.llamafactory",
                                description="LLaMA-Factory training with rimguard: a LLaMA-Factory YAML with a 'rimguard:' section")
    p.add_argument("config", type=Path, help="LLaMA-Factory YAML (its keys, plus 'rimguard:' with GuardConfig fields)")
    guard = train(p.parse_args(argv).config)
    print(f"rimguard: risk level {guard.level}, action in force: {guard.action}")


if __name__ == "__main__":
    main()
