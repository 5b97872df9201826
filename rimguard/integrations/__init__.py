"""Adapters for fine-tuning frameworks that build the ``Trainer`` themselves (Axolotl, LLaMA-Factory).

Each takes the guard's options from a ``rimguard:`` section of the framework's own YAML, validates them
as :class:`rimguard.GuardConfig` does, and adds a :class:`rimguard.RIMGuard` to the trainer the framework
builds. A module here imports its framework, which rimguard does not depend on.
"""
