"""rimguard: a training-time guard against reasoning-induced misalignment (RIM).

    from rimguard import RIMGuard, GuardConfig, NeuronAtlas
    trainer = SFTTrainer(..., callbacks=[RIMGuard(GuardConfig(probe_every=10))])
"""

from rimguard.atlas import AtlasError, NeuronAtlas
from rimguard.callback import RIMGuard
from rimguard.config import ConfigError, GuardConfig
from rimguard.probes import ProbeError, load_prompts

__all__ = ["RIMGuard", "GuardConfig", "NeuronAtlas", "AtlasError", "ConfigError", "ProbeError", "load_prompts"]
__version__ = "0.1.0"
