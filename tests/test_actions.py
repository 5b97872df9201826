"""Regularize and freeze: gradients, bitwise guarantees, Trainer integration."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from rimguard import RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import assert_grad_difference, tiny_model

REASONING = ["What is 2 + 3?", "A train goes 40 km per hour for 2 hours. How far?", "What is 7 * 6?"]


def sft(out, **kw):
    base = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=0.0, report_to=[],
                bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, seed=0,
                disable_tqdm=True, max_grad_norm=0.0)
    return SFTConfig(**{**base, **kw})


class GradRecorder(TrainerCallback):
    def __init__(self):
        self.grads, self.batches = None, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _record_batches(model, store):
    return model.register_forward_pre_hook(
        lambda m, a, k: store.append({x: k[x].clone() for x in ("input_ids", "attention_mask") if x in k}) if m.training else None,
        with_kwargs=True)


@pytest.mark.parametrize("lora", [False, True])
def test_penalty_gradient_through_trainer_with_accumulation(tmp_path, tok, fast_config, llama_atlas, lora):
    """grad(lambda=w) - grad(lambda=0) equals the mean over micro-batches of grad(w * P)."""
    w, grads, batches = 3.0, {}, []
    for weight in (w, 0.0):
        model = tiny_model("llama")
        if lora:
            model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
        guard = RIMGuard(fast_config(mode="regularize", regularizer="activation", reg_lambda=weight, probe_every=100), atlas=llama_atlas,
                         task_prompts=REASONING)
        rec = GradRecorder()
        store = []
        handle = _record_batches(model, store)
        trainer = SFTTrainer(model=model, args=sft(tmp_path / str(weight), max_steps=1, gradient_accumulation_steps=2),
                             train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok,
                             callbacks=[guard, rec])
        assert trainer.model_accepts_loss_kwargs  # the num_items_in_batch path (TRL computes its own fused loss)
        trainer.train()
        handle.remove()
        grads[weight], batches = rec.grads, store
    # the penalty alone, through the custom-loop API, on the same micro-batches and weights (lr = 0)
    guard = RIMGuard(fast_config(mode="regularize", regularizer="activation", reg_lambda=w), atlas=llama_atlas, task_prompts=REASONING)
    guard.engine.setup(model, tok, inject_loss=False)
    model.train()
    model.zero_grad()
    assert len(batches) == 2
    for batch in batches:
        model(**batch)
        (guard.engine.reg_loss() / len(batches)).backward()
    guard.engine.teardown()
    assert_grad_difference(model, grads[w], grads[0.0], rtol=1e-4, atol=5e-6)


def _train(model_type, tmp_path, tok, guard, steps=5):
    callbacks = [guard] if guard is not None else []
    trainer = SFTTrainer(model=tiny_model(model_type), args=sft(tmp_path, max_steps=steps, learning_rate=1e-3),
                         train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok, callbacks=callbacks)
    trainer.train()
    return trainer.model


def test_lambda_zero_is_bitwise_identical_to_unguarded(tmp_path, tok, fast_config):
    """gpt2 has dropout, so any RNG drawn by the guard would show up."""
    plain = _train("gpt2", tmp_path / "a", tok, None)
    guarded = _train("gpt2", tmp_path / "b", tok, RIMGuard(fast_config(mode="regularize", reg_lambda=0.0, probe_every=2)))
    for (n, a), (_, b) in zip(plain.named_parameters(), guarded.named_parameters()):
        assert torch.equal(a, b), n
    changed = _train("gpt2", tmp_path / "c", tok, RIMGuard(fast_config(mode="regularize", reg_lambda=5.0, probe_every=2)))
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), changed.parameters()))


def _slices(layers, per_layer, weight_of):
    out = []
    for layer, ids in zip(layers, per_layer):
        for proj in layer.inputs:
            rows = torch.cat([ids + c * layer.size for c in range(proj.out_features // layer.size)])
            out.append(weight_of(proj).index_select(1 if proj.transposed else 0, rows).clone())
        out.append(weight_of(layer.down).index_select(0 if layer.down.transposed else 1, ids).clone())
    return out


def _merged(proj):
    weight = proj.base.weight.detach().clone()
    module = proj.module
    for adapter in getattr(module, "lora_A", {}):
        weight += module.get_delta_weight(adapter)
    return weight


@pytest.mark.parametrize("family,lora", [("llama", False), ("gpt2", False), ("llama", True), ("phi3", True)])
def test_freeze_holds_bitwise_through_adamw_with_weight_decay(tok, fast_config, family, lora):
    from rimguard.atlas import NeuronAtlas
    from rimguard.probes import bundled

    torch.manual_seed(0)
    model = tiny_model(family)
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:8], bundled("intent"), top_m=10, min_share=0.25,
                                 num_controls=2, max_new_tokens=4, max_length=128, progress=False)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    guard = RIMGuard(fast_config(mode="monitor"), atlas=atlas, task_prompts=REASONING)
    guard.engine.setup(model, tok)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 500, (4, 12))
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        guard.engine.after_optimizer_step()

    for _ in range(3):  # momentum builds up first: the freeze starts mid-run
        step()
    layers, per_layer = guard.engine.monitor.layers, atlas.safety_per_layer()
    weight_of = _merged if lora else (lambda p: p.base.weight.detach())
    all_before = [weight_of(l.down).clone() for l in layers]
    before = _slices(layers, per_layer, weight_of)
    guard.engine.freezer.freeze(per_layer)
    assert all(torch.equal(a, b) for a, b in zip(before, _slices(layers, per_layer, weight_of)))  # freezing changes nothing
    for _ in range(20):
        step()
    after = _slices(layers, per_layer, weight_of)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, weight_of(l.down)) for a, l in zip(all_before, layers))  # other neurons moved
    guard.engine.teardown()


def test_freeze_mode_in_trainer_and_escalation(tmp_path, tok, fast_config, llama_atlas):
    before = tiny_model("llama")
    per_layer = llama_atlas.safety_per_layer()
    guard = RIMGuard(fast_config(mode="freeze"), atlas=llama_atlas)
    model = _train("llama", tmp_path, tok, guard, steps=4)
    from rimguard.hooks.arch import find_mlp_layers

    get = lambda p: p.base.weight.detach()
    for a, b in zip(_slices(find_mlp_layers(before), per_layer, get), _slices(find_mlp_layers(model), per_layer, get)):
        assert torch.equal(a, b)
    assert guard.engine.freezer.count == llama_atlas.num_safety


def test_escalate_freezes_top_first_then_all_and_stops(tmp_path, tok, fast_config, llama_atlas):
    th = {"warn": {"task_rise": -1.0}, "regularize": {"task_rise": -1.0}, "freeze": {"task_rise": -1.0}, "stop": {"task_rise": 1e9}}
    calls = []
    guard = RIMGuard(fast_config(mode="escalate", thresholds=th, freeze_top_fraction=0.5, probe_every=2), atlas=llama_atlas,
                     on_alert=lambda d, m, s: calls.append((d.level, s)))
    _train("llama", tmp_path, tok, guard, steps=2)
    assert calls == [("freeze", 1)]
    assert guard.engine.freezer.count == max(1, round(0.5 * llama_atlas.num_safety))
    assert (tmp_path / "checkpoint-1").is_dir()  # the jump ok -> freeze still took warn's checkpoint
    events = (tmp_path / "rimguard.jsonl").read_text()
    assert '"event": "level"' in events and '"which": "top"' in events
    th["stop"] = {"task_rise": -1.0}
    guard = RIMGuard(fast_config(mode="escalate", thresholds=th, probe_every=2), atlas=llama_atlas)
    trainer = SFTTrainer(model=tiny_model("llama"), args=sft(tmp_path / "s", max_steps=6, learning_rate=1e-3),
                         train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok, callbacks=[guard])
    trainer.train()
    assert trainer.state.global_step == 1 and guard.engine.freezer.count == llama_atlas.num_safety


def test_each_crossing_is_warned_once_while_it_lasts(tmp_path, tok, fast_config, llama_atlas, caplog):
    th = {"warn": {"task_rise": -1.0, "kl_task": 1e9}, "regularize": {}, "freeze": {}, "stop": {}}
    guard = RIMGuard(fast_config(mode="monitor", thresholds=th, probe_every=1), atlas=llama_atlas)
    with caplog.at_level("WARNING", logger="rimguard"):
        _train("llama", tmp_path, tok, guard, steps=4)
    assert len(guard.history) == 4 and all(h["level"] == 1.0 for h in guard.history)
    crossed = [r.getMessage() for r in caplog.records if "crossed" in r.getMessage()]
    assert len(crossed) == 1 and crossed[0].startswith("rimguard: task_rise=")


def test_freeze_is_accepted_under_every_backend_and_the_parameter_anchor_refused_where_sharded(fast_config):
    from types import SimpleNamespace

    from rimguard.actions import check_backend
    from rimguard.callback import _backend

    deepspeed = _backend(SimpleNamespace(deepspeed="ds.json", fsdp=None))
    for backend in (deepspeed, "fsdp", "zero3"):  # each rank holds its part of the slices (tests/test_fsdp.py, test_deepspeed.py)
        assert check_backend(fast_config(mode="freeze"), backend) is None
        check_backend(fast_config(mode="regularize", regularizer="activation"), backend)
        with pytest.raises(RuntimeError, match=f"regularizer='params' is not supported under {backend}"):
            check_backend(fast_config(mode="regularize", regularizer="params"), backend)
