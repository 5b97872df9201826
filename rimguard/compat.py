"""Shims over the differences between the ``transformers`` releases rimguard supports."""

from __future__ import annotations


def no_checkpointing() -> dict[str, bool]:
    """``TrainingArguments`` keyword that turns activation checkpointing off, under the field name of the
    installed transformers (``activation_checkpointing`` in recent releases, ``gradient_checkpointing`` in 5.20 and earlier)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: False}
