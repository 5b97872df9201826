"""RIMGuard attached to TRL's DPOTrainer and GRPOTrainer (tiny model, trivial reward)."""

import json

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

from rimguard import RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.hooks.arch import find_mlp_layers
from rimguard.probes.reasoning import problems
from rimguard.testing import tiny_model

COMMON = dict(report_to=[], bf16=False, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=100)


def _frozen_slices(model, atlas):
    layers = find_mlp_layers(model)
    return [l.down.base.weight.detach()[:, ids].clone() for l, ids in zip(layers, atlas.safety_per_layer())]


def _check(guard, out, steps):
    events = [json.loads(l) for l in (out / "rimguard.jsonl").read_text().splitlines()]
    metrics = [e for e in events if e["event"] == "metrics"]
    assert metrics and metrics[-1]["step"] == steps
    assert all(e["ras_safe"] is not None and e["refusal_margin"] is not None for e in metrics)
    assert not guard.engine.attached()


@pytest.mark.parametrize("mode", ["regularize", "freeze"])
def test_dpo(tmp_path, tok, fast_config, llama_atlas, mode):
    rows = [{"prompt": p.question, "chosen": p.solution(), "rejected": f"The answer is {p.answer + 3}."} for p in problems(16)]
    model = tiny_model("llama")
    before = _frozen_slices(model, llama_atlas)
    guard = RIMGuard(fast_config(mode=mode, probe_every=3, anchor_every=1), atlas=llama_atlas)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                     max_length=128, **no_checkpointing(), **COMMON)
    trainer = DPOTrainer(model=model, ref_model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[guard])
    trainer.train()
    _check(guard, tmp_path, 3)
    if mode == "freeze":
        assert all(torch.equal(a, b) for a, b in zip(before, _frozen_slices(trainer.model, llama_atlas)))
    else:
        assert guard.history[-1]["anchor_kl"] > 0  # the safety anchor (default regularizer) ran under DPO


def test_grpo(tmp_path, tok, fast_config, llama_atlas):
    rows = [{"prompt": [{"role": "user", "content": p.question}]} for p in problems(8)]

    def reward_len(completions, **kw):  # trivial reward: shorter is better
        return [-float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    model = tiny_model("llama")
    before = _frozen_slices(model, llama_atlas)
    guard = RIMGuard(fast_config(mode="freeze", probe_every=2), atlas=llama_atlas)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, learning_rate=1e-3, **no_checkpointing(), **COMMON)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[guard])
    trainer.train()
    _check(guard, tmp_path, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, _frozen_slices(trainer.model, llama_atlas)))
