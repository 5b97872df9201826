"""The actions on the model, and the registry of regularizers.

* :mod:`.regularizer` - the :class:`Regularizer` protocol every ``regularize`` action implements;
* :mod:`.anchor` - the safety anchor (default), :mod:`.activation` - the activation penalty,
  :mod:`.params` - parameter anchoring;
* :mod:`.tie` - lambda, and the tie of a regularizer's loss into the trainer's backward;
* :mod:`.freeze` - holding neurons fixed; :mod:`.executors` - what each policy action does.

The policy (:mod:`rimguard.policy`) decides when each runs.
"""

from __future__ import annotations

from typing import Any

from rimguard.actions.activation import ActivationPenalty
from rimguard.actions.anchor import SafetyAnchor
from rimguard.actions.params import ParamAnchor
from rimguard.actions.regularizer import BuildContext, Regularizer

REGULARIZERS: dict[str, type[Regularizer]] = {
    SafetyAnchor.name: SafetyAnchor,
    ActivationPenalty.name: ActivationPenalty,
    ParamAnchor.name: ParamAnchor,
}


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Add a :class:`Regularizer` subclass to :data:`REGULARIZERS` under its ``name`` (usable as a decorator);
    ``GuardConfig(regularizer=cls.name)`` then selects it."""
    if not (isinstance(cls, type) and issubclass(cls, Regularizer) and cls.name):
        raise TypeError("register() takes a Regularizer subclass with a non-empty 'name'")
    REGULARIZERS[cls.name] = cls
    return cls


def check_backend(config: Any, backend: str) -> type[Regularizer] | None:
    """The regularizer class ``config`` uses (None if no level regularizes), after checking that it works under the
    training ``backend`` (the freeze works under every one); a clear error naming the setting otherwise."""
    reg_cls = REGULARIZERS[config.actions.regularizer] if config.policy.regularizes() else None
    if reg_cls is not None and not reg_cls.supports(backend):
        raise RuntimeError(f"rimguard: regularizer='{reg_cls.name}' is not supported under {backend} (it works under "
                           f"{', '.join(reg_cls.backends)}); choose another regularizer or train without sharding")
    return reg_cls


__all__ = ["check_backend", "REGULARIZERS", "BuildContext", "Regularizer", "register", "SafetyAnchor", "ActivationPenalty", "ParamAnchor"]
