import logging

import pytest
import torch

from rimguard import GuardConfig, NeuronAtlas
from rimguard.probes import bundled
from rimguard.testing import tiny_model, tiny_tokenizer

# Small, fast settings used by the end-to-end tests.
FAST = dict(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, probe_batch_size=6,
            kl_probes=2, max_length=128)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("rimguard").setLevel(logging.WARNING)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def fast_config():
    return lambda **kw: GuardConfig(**{**FAST, **kw})


@pytest.fixture(scope="session")
def llama_atlas(tok):
    model = tiny_model("llama")
    return NeuronAtlas.identify(model, tok, bundled("harmful")[:12], bundled("intent"), top_m=12, min_share=0.25,
                                num_controls=8, max_new_tokens=6, max_length=128, progress=False)
