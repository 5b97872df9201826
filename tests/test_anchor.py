"""The safety anchor and parameter anchoring: gradients against independent references, disjoint
prompts, refusals of unsupported settings, the pure pieces against hand-computed values."""

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from rimguard import RIMGuard
from rimguard.actions.anchor import AnchorError
from rimguard.compat import no_checkpointing
from rimguard.probes import bundled
from rimguard.probes.reasoning import reasoning_texts
from rimguard.signals import metrics
from rimguard.testing import assert_grad_difference, tiny_model

ANCHOR = dict(mode="regularize", regularizer="anchor", anchor_max_new_tokens=6, anchor_batch_size=4, probe_every=100)


def sft(out, **kw):
    base = dict(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=0.0, report_to=[], bf16=False,
                **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, seed=0, disable_tqdm=True,
                max_grad_norm=0.0)
    return SFTConfig(**{**base, **kw})


class FirstGrads(TrainerCallback):
    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _model(lora):
    model = tiny_model("llama")
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")) if lora else model


def reference_anchor_loss(model, guard, mu):
    """KL(base || now) on the response tokens plus mu * one-sided neuron term, written out by hand
    from the stored record: full softmax, per-token loops, the down projections' inputs read by plain hooks."""
    rec, anchor = guard.engine.regularizer.record, guard.engine.regularizer
    rows = anchor.rows(0).tolist()
    layers = guard.engine.monitor.layers
    safety = guard.atlas.safety_per_layer()
    seen = {}
    handles = [layer.down.module.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i, layer in enumerate(layers)]
    kls, acts = [], []
    for r in rows:
        n = int(rec.attn[r].sum())
        ids = rec.ids[r : r + 1, :n]
        logp = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
        for j in range(rec.pos.shape[1]):
            if rec.resp_mask[r, j]:
                p0 = rec.base_logp[r, j].exp()
                now = logp[rec.pos[r, j]]
                tail0 = 1 - p0.sum()
                tailt = 1 - now[rec.base_index[r, j]].exp().sum()
                kls.append((p0 * (rec.base_logp[r, j] - now[rec.base_index[r, j]])).sum() + tail0 * (tail0.log() - tailt.log()))
        if rec.harmful[r]:
            peak = torch.cat([seen[i][0, :n][:, ids_.long()].max(0).values for i, ids_ in enumerate(safety) if ids_.numel()])
            acts.append((peak, rec.act_ref[r]))
    for h in handles:
        h.remove()
    kl = torch.stack(kls).mean()
    now = torch.stack([a for a, _ in acts])
    ref = torch.stack([b for _, b in acts])
    scale = ref.abs().clamp_min(guard.config.monitor.rel_floor * ref.abs().mean())
    act = (torch.relu(ref - now) / scale).pow(2).mean()
    return kl + mu * act


@pytest.mark.parametrize("lora", [False, True])
def test_anchor_gradient_joins_the_trainer_step_with_accumulation(tmp_path, tok, fast_config, llama_atlas, lora):
    """grad(lambda=w) - grad(lambda=0) equals w * grad(anchor loss) computed by hand, once per optimizer step."""
    w, mu, grads = 2.0, 0.5, {}
    for weight in (w, 0.0):
        model = _model(lora)
        guard = RIMGuard(fast_config(**ANCHOR, reg_lambda=weight, anchor_act_weight=mu), atlas=llama_atlas)
        rec = FirstGrads()
        trainer = SFTTrainer(model=model, args=sft(tmp_path / str(weight), gradient_accumulation_steps=2),
                             train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok, callbacks=[guard, rec])
        trainer.train()
        grads[weight] = rec.grads
        if weight == w:
            assert guard.history[-1]["anchor_kl"] >= 0 and "anchor_act" in guard.history[-1]
    # the reference: the same (unchanged, lr = 0) model, the anchor loss written out by hand
    guard = RIMGuard(fast_config(**ANCHOR, reg_lambda=w, anchor_act_weight=mu), atlas=llama_atlas)
    guard.engine.setup(model, tok, inject_loss=False)
    model.train()
    model.zero_grad()
    ref_loss = reference_anchor_loss(model, guard, mu)
    (w * ref_loss).backward()
    guard.engine.teardown()
    assert_grad_difference(model, grads[w], grads[0.0], rtol=1e-3, atol=1e-6)


def test_custom_loop_anchor_matches_reference(tok, fast_config, llama_atlas):
    model = tiny_model("llama")
    guard = RIMGuard(fast_config(**ANCHOR, reg_lambda=1.5, anchor_act_weight=1.0), atlas=llama_atlas)
    guard.engine.setup(model, tok, inject_loss=False)
    model.train()
    guard.engine.begin_step(0)
    got = guard.engine.reg_loss()
    want = 1.5 * reference_anchor_loss(model, guard, 1.0)
    guard.engine.teardown()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert guard.engine.reg_loss() is None  # taken once per step


def test_anchor_rows_rotate_and_mix_harmful_with_harmless(tok, fast_config, llama_atlas):
    guard = RIMGuard(fast_config(**ANCHOR, reg_lambda=1.0, anchor_every=2), atlas=llama_atlas)
    guard.engine.setup(tiny_model("llama"), tok, inject_loss=False)
    anchor = guard.engine.regularizer
    total = anchor.record.ids.shape[0]
    assert anchor.due(0) and not anchor.due(1) and anchor.due(2)
    assert anchor.rows(0).tolist() == [0, 1, 2, 3] and anchor.rows(2).tolist() == [4, 5, 6, 7]
    assert anchor.rows(2 * (total // 4)).tolist() == [0, 1, 2, 3] if total % 4 == 0 else True
    flags = anchor.record.harmful[anchor.rows(0)].tolist()
    assert 0 < sum(flags) < len(flags)  # both kinds in every batch
    guard.engine.teardown()


def test_bundled_anchor_prompts_are_disjoint_from_every_other_set():
    anchor = set(bundled("anchor_harmful")) | set(bundled("anchor_harmless"))
    others = set().union(*(bundled(n) for n in ("harmful", "harmless", "intent", "refusals")))
    assert len(bundled("anchor_harmful")) >= 32 and len(bundled("anchor_harmless")) >= 32
    assert not anchor & others


def test_anchor_prompts_overlapping_monitor_probes_are_refused(tok, fast_config, llama_atlas):
    overlap = [llama_atlas.probe_prompts[0], "A new harmful request nobody probes."]
    guard = RIMGuard(fast_config(**ANCHOR, reg_lambda=1.0), atlas=llama_atlas, anchor_prompts=overlap)
    with pytest.raises(AnchorError, match="also monitor probes"):
        guard.engine.setup(tiny_model("llama"), tok)


@pytest.mark.parametrize("backend,regularizer", [("deepspeed", "params"), ("zero3", "params"), ("fsdp", "params")])
def test_unsupported_sharding_is_refused_before_training(tok, fast_config, backend, regularizer):
    from rimguard.actions import check_backend

    with pytest.raises(RuntimeError, match=f"regularizer='{regularizer}' is not supported under {backend}"):
        check_backend(fast_config(mode="regularize", regularizer=regularizer), backend)
    check_backend(fast_config(mode="regularize", regularizer="activation"), backend)


def test_the_trainer_backend_is_read_from_its_arguments_and_sharding_from_the_model(tok):
    from types import SimpleNamespace

    from torch.distributed.fsdp import FullyShardedDataParallel

    from rimguard import dist
    from rimguard.callback import _backend

    assert _backend(SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}}, world_size=2)) == "deepspeed"
    assert _backend(SimpleNamespace(deepspeed=None, fsdp="full_shard", world_size=2)) == "ddp"  # on CPU the Trainer runs DDP
    model = tiny_model("llama")
    assert dist.backend_of(model, "ddp") == "ddp"
    next(model.parameters()).ds_id = 0  # what ZeRO-3 puts on its partitioned parameters
    assert dist.backend_of(model, "deepspeed") == "zero3"
    from rimguard import GuardConfig
    from rimguard.actions import SafetyAnchor, check_backend

    assert check_backend(GuardConfig(mode="regularize"), "zero3") is SafetyAnchor
    with pytest.raises(RuntimeError, match="regularizer='params' is not supported under zero3 .* choose another"):
        check_backend(GuardConfig(mode="regularize", regularizer="params"), "zero3")
    class Flat(FullyShardedDataParallel):  # its type is what is read: no process group needed
        __init__, __getattr__ = torch.nn.Module.__init__, torch.nn.Module.__getattr__

    wrapper = torch.nn.Module()
    wrapper.inner = Flat()
    with pytest.raises(RuntimeError, match="FSDP1 .* use FSDP2"):
        dist.backend_of(wrapper, "ddp")


def test_lambda_zero_anchor_is_bitwise_identical_to_unguarded(tmp_path, tok, fast_config):
    def train(guard):
        trainer = SFTTrainer(model=tiny_model("gpt2"), args=sft(tmp_path / str(id(guard)), max_steps=4, learning_rate=1e-3),
                             train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok,
                             callbacks=[guard] if guard else [])
        trainer.train()
        return list(trainer.model.parameters())

    plain = train(None)
    zero = train(RIMGuard(fast_config(**{**ANCHOR, "probe_every": 2}, reg_lambda=0.0)))
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    anchored = train(RIMGuard(fast_config(**{**ANCHOR, "probe_every": 2}, reg_lambda=3.0)))
    assert any(not torch.equal(a, b) for a, b in zip(plain, anchored))


def test_param_anchor_gradient_is_two_lambda_delta(tok, fast_config, llama_atlas):
    model = tiny_model("llama")
    guard = RIMGuard(fast_config(mode="regularize", regularizer="params", reg_lambda=3.0), atlas=llama_atlas)
    guard.engine.setup(model, tok, inject_loss=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    start = {id(p): s for (p, _), s in zip(guard.engine.regularizer.slices, guard.engine.regularizer.start)}
    model.zero_grad()
    guard.engine.begin_step(0)
    guard.engine.reg_loss().backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, 2 * 3.0 * (p.detach() - start[id(p)]))
    guard.engine.teardown()


def test_param_anchor_safety_scope_touches_only_safety_slices(tok, fast_config, llama_atlas):
    model = tiny_model("llama")
    guard = RIMGuard(fast_config(mode="regularize", regularizer="params", param_scope="safety", reg_lambda=1.0), atlas=llama_atlas)
    guard.engine.setup(model, tok, inject_loss=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.zero_grad()
    guard.engine.begin_step(0)
    guard.engine.reg_loss().backward()
    down = guard.engine.monitor.layers[0].down.base.weight
    safety0 = guard.atlas.safety_per_layer()[0]
    assert torch.count_nonzero(down.grad.abs().sum(0)) == safety0.numel()  # only those columns
    assert model.model.embed_tokens.weight.grad is None
    guard.engine.teardown()


def test_shrink_penalty_hand_computed():
    ref = torch.tensor([2.0, 1.0, 0.001, 3.0])
    now = torch.tensor([1.0, 1.5, -1.0, 3.0])
    # scale: max(|ref|, 0.05 * mean|ref|) = [2, 1, 0.0750125, 3]; shrink only where ref > now
    expected = ((1.0 / 2.0) ** 2 + 0 + (1.001 / 0.0750125) ** 2 + 0) / 4
    torch.testing.assert_close(metrics.shrink_penalty(ref, now, 0.05), torch.tensor(expected))


def test_freeze_share_freezes_that_share_of_all_neurons(tok, fast_config, llama_atlas):
    model = tiny_model("llama")
    guard = RIMGuard(fast_config(mode="freeze", freeze_share=0.1), atlas=llama_atlas)
    guard.engine.setup(model, tok)
    total = sum(llama_atlas.layer_sizes)
    assert guard.engine.freezer.count == round(0.1 * total)
    top = llama_atlas.ranking.topk(round(0.1 * total)).indices.sort().values
    frozen = torch.cat([f + sum(llama_atlas.layer_sizes[:i]) for i, f in enumerate(guard.engine.freezer.frozen)]).sort().values
    assert torch.equal(frozen, top)
    guard.engine.teardown()
