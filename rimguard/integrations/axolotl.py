"""rimguard as an Axolotl plugin: the guard's options under a ``rimguard:`` section of the Axolotl YAML.

.. code-block:: yaml

    plugins:
      - rimguard.integrations.axolotl.RIMGuardPlugin
    rimguard:              # GuardConfig fields, flat or by section; absent or empty: the defaults (mode=monitor)
      mode: regularize
      probe_every: 10

The section is validated with the rest of the Axolotl config (a bad field is an error before the model
loads, naming the field), and the guard is attached to the trainer Axolotl builds, so its ``rimguard/*``
metrics go through ``Trainer.log`` to Axolotl's loggers. Tested with Axolotl 0.19.0 (``tests/test_frameworks.py``).
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, field_validator

from rimguard.callback import RIMGuard
from rimguard.config import GuardConfig


class RIMGuardArgs(BaseModel):
    """The plugin's keys in the Axolotl config: ``rimguard``, a mapping of :class:`GuardConfig` fields."""

    rimguard: dict[str, Any] | None = None

    @field_validator("rimguard")
    @classmethod
    def _guard_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            GuardConfig.of(value)  # a ConfigError is a ValueError: pydantic reports it under the 'rimguard' key
        return value


class RIMGuardPlugin(BasePlugin):
    """Adds a :class:`RIMGuard` built from ``cfg.rimguard`` to the trainer Axolotl builds."""

    def get_input_args(self) -> str:
        return "rimguard.integrations.axolotl.RIMGuardArgs"

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[RIMGuard]:
        return [RIMGuard(GuardConfig.of(cfg.rimguard or {}), trainer=trainer)]
