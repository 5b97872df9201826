"""A new regularizer is one class and one registry entry: a toy L2 pull on one layer, registered here, runs
through mode="regularize" in an SFTTrainer like the built-in ones (lambda, loss tie, logging, start event)."""

import json

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rimguard import ConfigError, GuardConfig, RIMGuard
from rimguard.actions import REGULARIZERS, BuildContext, Regularizer, register
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.saved import Saved
from rimguard.testing import tiny_model


class LayerPull(Regularizer):
    """``sum (W - W_0)^2`` over the last MLP layer's down projection: a step loss."""

    name = "toy-layer-pull"
    default_lambda = 50.0
    optimises = ("toy_pull",)

    def __init__(self, weight: torch.nn.Parameter) -> None:
        self.weight, self.start = weight, weight.detach().clone()
        self.calls = 0

    @classmethod
    def build(cls, ctx: BuildContext) -> "LayerPull":
        pull = cls(ctx.capture.layers[-1].down.base.weight)
        if ctx.restored is not None:
            pull.start = ctx.restored.tensors["start"]
        return pull

    def step_loss(self, step: int) -> torch.Tensor:
        self.calls += 1
        return (self.weight - self.start).pow(2).sum()

    def logged(self) -> dict[str, float]:
        return {"toy_pull": float((self.weight - self.start).pow(2).sum())}

    def state_dict(self) -> Saved:
        return Saved({"start": self.start})


@pytest.fixture()
def registered():
    register(LayerPull)
    yield LayerPull
    REGULARIZERS.pop(LayerPull.name)


def _train(tmp_path, tok, atlas, guard):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
                     bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, seed=0, disable_tqdm=True)
    model = tiny_model("llama")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok,
                         callbacks=[guard] if guard is not None else [])
    trainer.train()
    return model.model.layers[-1].mlp.down_proj.weight.detach().clone()


def test_a_registered_regularizer_runs_through_mode_regularize(tmp_path, tok, fast_config, llama_atlas, registered):
    guard = RIMGuard(fast_config(mode="regularize", regularizer="toy-layer-pull", probe_every=2), atlas=llama_atlas)
    pulled = _train(tmp_path / "a", tok, llama_atlas, guard)
    free = _train(tmp_path / "b", tok, llama_atlas, None)
    start = tiny_model("llama").model.layers[-1].mlp.down_proj.weight.detach()
    assert guard.engine.regularizer.calls == 4  # its step loss, once per optimizer step
    assert [h["reg_lambda"] for h in guard.history] == [50.0] * 3  # its default lambda
    assert all("toy_pull" in h for h in guard.history)
    assert (pulled - start).norm() < 0.5 * (free - start).norm()  # the tie carried its gradient into the trainer's step
    start_event = json.loads((tmp_path / "a" / "rimguard.jsonl").read_text().splitlines()[0])
    assert start_event["regularizer"] == "toy-layer-pull" and start_event["optimised_signals"] == ["toy_pull"]


def test_an_unregistered_name_is_a_config_error_naming_the_registry():
    with pytest.raises(ConfigError, match="must be one of .*'anchor'"):
        GuardConfig(regularizer="toy-layer-pull")
    with pytest.raises(TypeError, match="Regularizer subclass"):
        register(object)
