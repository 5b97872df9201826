"""The atlas: which MLP neurons are safety-critical (:mod:`.core`), chosen by pure selection math (:mod:`.selection`)."""

from rimguard.atlas.core import FORMAT_VERSION, AtlasError, NeuronAtlas, fingerprint

__all__ = ["NeuronAtlas", "AtlasError", "fingerprint", "FORMAT_VERSION"]
