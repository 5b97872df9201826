"""End-to-end: RIMGuard in real Trainer / SFTTrainer runs on tiny models."""

import json

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from rimguard import AtlasError, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model

EXPECTED = {"ras_safe", "ras_control_mean", "entanglement_z", "entanglement_pct", "safety_drop", "task_rise",
            "kl_task", "refusal_margin", "refusal_drop", "level", "reg_lambda", "frozen"}


def sft_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=3,
                report_to=[], bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True,
                max_length=128, seed=0, disable_tqdm=True)
    return SFTConfig(**{**base, **kw})


def assert_guarded_run(trainer, guard, out, steps, attached=True):
    """``attached``: the guard knows its trainer (RIMGuard.attach), so its metrics also go through Trainer.log."""
    model = trainer.model
    logged = [h for h in trainer.state.log_history if "rimguard/ras_safe" in h]
    assert [h["step"] for h in logged] == ([1, 2, 4, steps] if attached else [])
    # a guard check at a logging step must not swallow the Trainer's own loss log
    assert any("loss" in h and h["step"] == steps for h in trainer.state.log_history)
    if attached:
        assert EXPECTED <= {k.split("/", 1)[1] for k in logged[-1] if k.startswith("rimguard/")}
    assert EXPECTED <= set(guard.history[-1])
    events = [json.loads(l) for l in (out / "rimguard.jsonl").read_text().splitlines()]
    metric_steps = [e["step"] for e in events if e["event"] == "metrics"]
    assert metric_steps == [1, 2, 4, steps]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert all(torch.isfinite(torch.tensor(e["ras_safe"])) for e in events if e["event"] == "metrics")
    assert (out / "rimguard_atlas" / "atlas.safetensors").is_file()
    # hooks are gone after training
    assert not guard.engine.attached()
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks, type(m).__name__


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trainer(tmp_path, tok, fast_config, lora):
    peft_config = LoraConfig(r=4, target_modules="all-linear") if lora else None
    trainer = SFTTrainer(model=tiny_model("llama"), args=sft_args(tmp_path), train_dataset=Dataset.from_list(reasoning_texts(32)),
                         processing_class=tok, peft_config=peft_config)
    guard = RIMGuard.attach(trainer, fast_config(probe_every=6))
    trainer.train()
    assert_guarded_run(trainer, guard, tmp_path, 6)


def test_plain_trainer(tmp_path, tok, fast_config):
    texts = [r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in reasoning_texts(32)]
    ds = Dataset.from_dict({"text": texts}).map(lambda b: tok(b["text"], truncation=True, max_length=128), batched=True,
                                                 remove_columns=["text"])
    guard = RIMGuard(fast_config(probe_every=6), tokenizer=tok)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=3)
    trainer = Trainer(model=tiny_model("qwen2"), args=args, train_dataset=ds, callbacks=[guard],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    assert_guarded_run(trainer, guard, tmp_path, 6, attached=False)  # in callbacks=[...]: no trainer known, no stack walk


def test_reasoning_probes_and_loaded_atlas(tmp_path, tok, fast_config, llama_atlas):
    """With a loaded atlas and user reasoning probes, references come from those probes."""
    guard = RIMGuard(fast_config(probe_every=3), atlas=llama_atlas, task_prompts=["What is 2 + 3?", "What is 7 * 6?"])
    trainer = SFTTrainer(model=tiny_model("llama"), args=sft_args(tmp_path, max_steps=3),
                         train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok, callbacks=[guard])
    trainer.train()
    assert guard.engine.monitor.kl_ids.shape[0] == 2
    assert not (tmp_path / "rimguard_atlas").exists()  # a given atlas is not re-identified


def test_loading_atlas_into_wrong_model_fails(tmp_path, tok, fast_config, llama_atlas):
    guard = RIMGuard(fast_config(), atlas=llama_atlas)
    trainer = SFTTrainer(model=tiny_model("llama", seed=3), args=sft_args(tmp_path, max_steps=1),
                         train_dataset=Dataset.from_list(reasoning_texts(8)), processing_class=tok, callbacks=[guard])
    with pytest.raises(AtlasError, match="other weights of the same architecture"):
        trainer.train()


def test_a_guard_refuses_a_second_train_with_a_clear_error(tmp_path, tok, fast_config, llama_atlas):
    from rimguard.state import GuardStateError

    guard = RIMGuard(fast_config(), atlas=llama_atlas)
    trainer = SFTTrainer(model=tiny_model("llama"), args=sft_args(tmp_path, max_steps=2), train_dataset=Dataset.from_list(reasoning_texts(8)),
                         processing_class=tok, callbacks=[guard])
    trainer.train()
    with pytest.raises(GuardStateError, match="already guarded a run .ended at step 2.*new RIMGuard"):
        trainer.train()
    assert not guard.engine.attached()


def _drive(engine, model, tok, steps):
    """A plain PyTorch loop through the engine's API; returns the reports and the steps run."""
    from rimguard.passes import encode

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.tensor([encode(tok, reasoning_texts(1)[0]["prompt"][0]["content"])[:24]] * 4)
    reports, step = [], 0
    while step < steps:
        engine.begin_step(step)
        loss = model(input_ids=ids, labels=ids).loss
        extra = engine.reg_loss()
        (loss if extra is None else loss + extra).backward()
        engine.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        engine.after_optimizer_step()
        step += 1
        report = engine.end_step(step)
        if report is not None:
            reports.append(report)
            if report.stop:
                break
    engine.finish(step)
    return reports, step


@pytest.mark.parametrize("stop", [False, True])
def test_engine_in_a_hand_written_loop_without_a_trainer(tmp_path, tok, fast_config, llama_atlas, stop):
    """GuardEngine drives a plain PyTorch loop: checks on the injected schedule, the plan's checkpoint
    and stop reach the loop through the Report, and finish() leaves no hook."""
    from rimguard import GuardEngine

    th = {"warn": {"task_rise": 0.0}, "regularize": {}, "freeze": {}, "stop": {"kl_task": 0.0} if stop else {}}
    engine = GuardEngine(fast_config(mode="escalate", thresholds=th, hysteresis=0.0), atlas=llama_atlas,
                         schedule=lambda step: step in (1, 3, 5))
    engine.setup(tiny_model("llama"), tok, output_dir=tmp_path, inject_loss=False)
    reports, steps = _drive(engine, engine.monitor.model, tok, 8)
    events = [json.loads(line) for line in (tmp_path / "rimguard.jsonl").read_text().splitlines()]
    if stop:  # kl_task > 0 after one update crosses 'stop' at the first check; the jumped-over warn checkpoint is still asked
        assert [(r.step, r.save, r.stop) for r in reports] == [(1, True, True)] and steps == 1 and engine.level == "stop"
        assert [e["event"] for e in events if e["event"] in ("stop", "end")] == ["stop", "end"]
    else:
        assert [(r.step, r.save, r.stop) for r in reports] == [(1, True, False), (3, False, False), (5, False, False)]
        assert steps == 8 and engine.level == "warn" and [h["step"] for h in engine.history] == [1, 3, 5, 8]  # + the final check
    assert not engine.attached()
