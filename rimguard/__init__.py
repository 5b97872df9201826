"""rimguard: a training-time guard against reasoning-induced misalignment (RIM).

    from rimguard import RIMGuard, GuardConfig
    trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok)
    guard = RIMGuard.attach(trainer, GuardConfig(mode="regularize", probe_every=10))

Custom training loops use :class:`GuardEngine` (the same guard, without a Trainer).
"""

from rimguard.atlas import AtlasError, NeuronAtlas
from rimguard.callback import RIMGuard
from rimguard.config import ActionsConfig, AtlasConfig, ConfigError, GuardConfig, MonitorConfig, PolicyConfig
from rimguard.engine import GuardEngine
from rimguard.policy import Report
from rimguard.probes import ProbeError, load_prompts
from rimguard.state import GuardStateError

__all__ = ["RIMGuard", "GuardEngine", "GuardConfig", "AtlasConfig", "MonitorConfig", "PolicyConfig", "ActionsConfig", "NeuronAtlas",
           "Report", "AtlasError", "ConfigError", "GuardStateError", "ProbeError", "load_prompts"]
__version__ = "0.1.0"
