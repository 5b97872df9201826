"""``Saved``: one part's checkpoint state, the unit every stateful part of the guard saves and loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Saved:
    """One part's state: ``tensors`` (saved as safetensors) and ``meta`` (JSON-serialisable data)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
