"""Non-finite values are faults, never "safe" readings: metrics propagate them, the policy never
lowers a level on them, and a guarded run with an inf weight logs a fault and holds its level."""

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.config import LEVELS, ConfigError
from rimguard.policy import RiskPolicy
from rimguard.probes.reasoning import reasoning_texts
from rimguard.signals import metrics
from rimguard.testing import tiny_model

TH = {"warn": {"entanglement_z": 2.0}, "regularize": {"entanglement_z": 3.0}, "freeze": {"entanglement_z": 5.0}, "stop": {}}
finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)  # activation scale
floats = st.one_of(finite, st.sampled_from([float("nan"), float("inf"), float("-inf")]))


def test_ras_of_nan_is_nan_not_zero():
    one, nan = torch.ones(3), torch.full((3,), float("nan"))
    out = metrics.ras(one, nan, one, nan)
    assert all(math.isnan(float(v)) for v in out.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(floats, floats, floats, floats), min_size=1, max_size=6))
def test_ras_is_finite_exactly_when_its_inputs_are(rows):
    safe0, safet, task0, taskt = (torch.tensor(c, dtype=torch.float32) for c in zip(*rows))
    out = metrics.ras(safe0, safet, task0, taskt)
    inputs_finite = all(torch.isfinite(t).all() for t in (safe0, safet, task0, taskt))
    if inputs_finite:  # finite inputs always give finite outputs ...
        assert all(torch.isfinite(v) for v in out.values()), out
    else:  # ... and a non-finite input never reads as a number
        assert not torch.isfinite(out["ras"]), out


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LEVELS[:-1]), st.lists(st.one_of(finite, floats), min_size=1, max_size=8))
def test_policy_never_falls_on_a_non_finite_value(start, values):
    policy = RiskPolicy(TH, hysteresis=0.1, patience=1, level=start)
    rank = LEVELS.index
    for v in values:
        before = policy.level
        decision = policy.update({"entanglement_z": v})
        if not math.isfinite(v):
            assert decision.faults == ["entanglement_z"]
            assert rank(policy.level) >= max(rank(before), rank("warn"))
        else:
            assert decision.faults == []


def test_non_finite_config_values_are_refused():
    with pytest.raises(ConfigError, match="reg_lambda"):
        GuardConfig(reg_lambda=float("inf"))
    with pytest.raises(ConfigError, match="finite"):
        GuardConfig(thresholds={"warn": {"entanglement_z": float("nan")}})
    with pytest.raises(ConfigError, match="fault_level"):
        GuardConfig(fault_level="panic")


class _Poison(TrainerCallback):
    """Writes inf into one up projection after optimizer step ``at``."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.at:
            with torch.no_grad():
                model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")


def test_inf_weight_mid_run_is_a_fault_and_the_level_holds(tmp_path, tok, fast_config, llama_atlas, caplog):
    th = {"warn": {"task_rise": 0.0}, "regularize": {"task_rise": 1e-4}, "freeze": {"task_rise": 1e9}, "stop": {}}
    guard = RIMGuard(fast_config(mode="escalate", thresholds=th, probe_every=1, hysteresis=0.0), atlas=llama_atlas)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                     bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, seed=0,
                     disable_tqdm=True, logging_steps=100, max_grad_norm=0.0)
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(reasoning_texts(24)),
                         processing_class=tok, callbacks=[guard, _Poison(3)])
    with caplog.at_level(logging.WARNING, logger="rimguard"):
        trainer.train()
    levels = {h["step"]: h["level"] for h in guard.history}
    assert levels[3] >= LEVELS.index("regularize")  # the run had escalated before the fault
    assert all(levels[s] >= levels[3] for s in levels if s > 3)  # and never fell after it
    events = [json.loads(l, parse_constant=float) for l in (tmp_path / "rimguard.jsonl").read_text().splitlines()]
    faults = [e for e in events if e["event"] == "fault"]
    assert faults and faults[0]["step"] == 4 and 1 in faults[0]["layers"]
    assert sum("non-finite" in r.getMessage() for r in caplog.records) == 1  # warned once while it lasts
    assert all(h["reg_lambda"] > 0 for h in guard.history if h["step"] > 3)  # lambda never dropped to 0
