"""Shims over the differences between the ``transformers`` releases rimguard supports."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any


def no_checkpointing() -> dict[str, bool]:
    """``TrainingArguments`` keyword that turns activation checkpointing off, under the field name of the
    installed transformers (``activation_checkpointing`` in recent releases, ``gradient_checkpointing`` in 5.20 and earlier)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: False}


def resumed_checkpoint(args: Any, step: int) -> Path | None:
    """The checkpoint folder the running ``Trainer.train()`` resumed from, or None for a fresh run (``step`` 0).

    Callbacks are not told the path, so it is read where the Trainer keeps it: the ``resume_from_checkpoint``
    argument of the ``train()`` call on the stack (already resolved to a folder when it was ``True``); then
    ``TrainingArguments.resume_from_checkpoint``; then ``output_dir/checkpoint-{step}`` (the Trainer's own
    naming). A checkpoint outside ``output_dir`` is thereby read where it is.
    """
    if step <= 0:
        return None
    frame = inspect.currentframe()
    while frame is not None:
        given = frame.f_locals.get("resume_from_checkpoint") if frame.f_code.co_name == "train" else None
        if isinstance(given, (str, os.PathLike)) and Path(given).is_dir():
            return Path(given)
        frame = frame.f_back
    given = getattr(args, "resume_from_checkpoint", None)
    if isinstance(given, str) and Path(given).is_dir():
        return Path(given)
    return Path(args.output_dir) / f"checkpoint-{step}"
