"""Mixture-of-experts models: capture against float64 references, missing values, the router share,
the per-expert freeze, the penalty's gradient, and guarded SFT runs of every MoE family."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rimguard.actions.activation import ActivationPenalty
from rimguard.actions.freeze import NeuronFreezer
from rimguard.hooks.arch import ExpertBank, UnsupportedModelError, find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.hooks.reduce import masked_max_sum
from rimguard.signals import metrics
from rimguard.signals.stream import RouterCount, TaskStream
from rimguard.testing import MOE_FAMILIES, tiny_model

FAMILIES = list(MOE_FAMILIES)


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 500, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, :8] = 0  # left padding: one real token, routed to 2 of the 4 experts
    return ids, mask


def _experts_inputs(model, layers):
    """Record each MoE layer's experts input (hidden [N, H], routes [N, k]) and its shared expert's input."""
    seen = {}
    handles = []
    for layer in layers:
        if layer.experts is None:  # a dense layer of a MoE model (DeepSeek-V3's first)
            def grab_dense(module, args, i=layer.index):
                seen[("shared", i)] = args[0].detach().double()
            handles.append(layer.down.module.register_forward_pre_hook(grab_dense))
            continue

        def grab(module, args, kwargs, i=layer.index):
            seen[i] = (args[0].detach().double(), args[1].detach().clone())
        handles.append(layer.experts.module.register_forward_pre_hook(grab, with_kwargs=True))
        if layer.down is not None:
            def grab_shared(module, args, i=layer.index):
                seen[("shared", i)] = args[0].detach().double()
            handles.append(layer.down.module.register_forward_pre_hook(grab_shared))
    return seen, handles


def _reference_rows(layer, hidden, routes, mask, shared):
    """float64 ``[B, size]``: the true per-sequence max over routed real tokens of every unit, NaN where none."""
    b, t = mask.shape
    if layer.experts is None:
        return shared.view(b, t, -1).masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
    bank = layer.experts
    act = bank.module.act_fn
    w = bank.module.gate_up_proj.detach().double()  # [E, 2I, H] (the tiny families' layout)
    rows = torch.full((b, layer.size), float("nan"), dtype=torch.float64)
    real = mask.reshape(-1).bool()
    for e in range(bank.num_experts):
        gate, up = F.linear(hidden, w[e]).chunk(2, dim=-1)  # the eager experts forward's own formula
        a = (act(gate) * up).view(b, t, -1)  # [B, T, I]
        routed = ((routes == e).any(-1) & real).view(b, t)
        for s in range(b):
            if routed[s].any():
                rows[s, e * bank.size : (e + 1) * bank.size] = a[s][routed[s]].amax(0)
    if shared is not None:
        x = shared.view(b, t, -1).masked_fill(~mask.bool()[..., None], float("-inf"))
        rows[:, bank.units :] = x.amax(1)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_float64_reference_of_true_expert_activations(family):
    model = tiny_model(family).eval()
    layers = find_mlp_layers(model)
    assert layers[-1].experts is not None
    ids, mask = _batch()
    seen, handles = _experts_inputs(model, layers)
    capture = ActivationCapture(model, layers).attach()
    with torch.no_grad(), capture.probing(full=True) as rows:
        model(input_ids=ids, attention_mask=mask)
    capture.remove()
    for h in handles:
        h.remove()
    got = rows[0].double()
    start = 0
    for layer in layers:
        hidden, routes = seen.get(layer.index, (None, None))
        ref = _reference_rows(layer, hidden, routes, mask, seen.get(("shared", layer.index)))
        part = got[:, start : start + layer.size]
        assert torch.equal(torch.isnan(part), torch.isnan(ref)), "missing values differ from the routing"
        assert torch.isnan(ref).any() == (layer.experts is not None), "the test batch should leave some units unrouted"
        torch.testing.assert_close(part, ref, rtol=1e-5, atol=1e-6, equal_nan=True)
        start += layer.size


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_tracked_units_equal_the_full_probe_and_padding_never_routes(family):
    model = tiny_model(family).eval()
    layers = find_mlp_layers(model)
    ids, mask = _batch(1)
    capture = ActivationCapture(model, layers).attach()
    with torch.no_grad(), capture.probing(full=True) as full:
        model(input_ids=ids, attention_mask=mask)
    gen = torch.Generator().manual_seed(0)
    tracked = [torch.randperm(layer.size, generator=gen)[:20].sort().values for layer in layers]
    capture.track(tracked)
    with torch.no_grad(), capture.probing() as some:
        model(input_ids=ids, attention_mask=mask)
    starts = [0, layers[0].size]
    expected = torch.cat([full[0][:, s + t] for s, t in zip(starts, tracked)], 1)
    torch.testing.assert_close(some[0], expected, equal_nan=True)
    # a sequence of padding only has no value anywhere (NaN for expert units)
    with torch.no_grad(), capture.probing(full=True) as empty:
        model(input_ids=ids[:1], attention_mask=torch.zeros_like(ids[:1]))
    expert_cols = torch.cat([torch.arange(s, s + layer.experts.units) for s, layer in zip(starts, layers)])
    assert torch.isnan(empty[0][:, expert_cols]).all()
    capture.remove()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_a_moe_layer_with_no_tracked_unit_reads_nothing_and_does_not_stop(family):
    """An atlas can leave a whole MoE layer without a safety unit (issue #22: routed_max crashed on 0 units)."""
    model = tiny_model(family).eval()
    layers = find_mlp_layers(model)
    ids, mask = _batch(2)
    capture = ActivationCapture(model, layers).attach()
    with torch.no_grad(), capture.probing(full=True) as full:
        model(input_ids=ids, attention_mask=mask)
    tracked = [torch.zeros(0, dtype=torch.long), torch.tensor([1, 5, layers[1].size - 1])]
    capture.track(tracked)
    with torch.no_grad(), capture.probing() as some:
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(some[0], full[0][:, layers[0].size + tracked[1]], equal_nan=True)
    capture.remove()


def test_metrics_leave_missing_units_out_entirely():
    gen = torch.Generator().manual_seed(0)
    safe0, safet, task0, taskt = (torch.rand(6, generator=gen) + 0.1 for _ in range(4))
    present = torch.tensor([True, True, False, True, False, True])
    safet_nan = safet.clone()
    safet_nan[~present] = float("nan")
    got = metrics.ras(safe0, safet_nan, task0, taskt, present=present)
    want = metrics.ras(safe0[present], safet[present], task0[present], taskt[present])
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    # a present entry that is NaN is still a fault, and a set with nothing present has no value
    assert torch.isnan(metrics.ras(safe0, safet_nan, task0, taskt, present=torch.ones(6, dtype=torch.bool))["ras"])
    assert torch.isnan(metrics.ras(safe0, safet, task0, taskt, present=torch.zeros(6, dtype=torch.bool))["safety_drop"])


def _bank_copy(bank: ExpertBank, transposed: bool, concatenated: bool) -> ExpertBank:
    """The same experts stored in another layout (weights rearranged, flags set)."""
    module = copy.deepcopy(bank.module)
    w = module.gate_up_proj.detach()  # [E, 2I, H] concatenated
    if not concatenated:
        gate, up = w.chunk(2, dim=1)
        w = torch.stack([gate, up], dim=2).reshape(w.shape)  # gate j at 2j, up j at 2j + 1
    down = module.down_proj.detach()
    if transposed:
        w, down = w.transpose(1, 2), down.transpose(1, 2)
    module.gate_up_proj = nn.Parameter(w.contiguous())
    module.down_proj = nn.Parameter(down.contiguous())
    return ExpertBank(bank.name, module, bank.num_experts, bank.size, transposed, concatenated)


@pytest.mark.parametrize("transposed,concatenated", [(True, True), (False, False), (True, False)])
def test_expert_layouts_give_the_same_units_and_slices(transposed, concatenated):
    bank = find_mlp_layers(tiny_model("mixtral"))[0].experts
    other = _bank_copy(bank, transposed, concatenated)
    units = torch.tensor([0, 5, 130, 511])
    for a, b in zip(bank.gate_up_rows(units), other.gate_up_rows(units)):
        assert (a is None and b is None) or torch.equal(a, b)
    for (name, at), (name2, at2) in zip(bank.slices(units), other.slices(units)):
        assert name == name2
        assert torch.equal(getattr(bank.module, name)[at], getattr(other.module, name)[at2])


def test_separate_expert_modules_are_refused_clearly():
    model = tiny_model("mixtral")
    mlp = model.model.layers[0].mlp
    mlp.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
    with pytest.raises(UnsupportedModelError, match="fused expert layout"):
        find_mlp_layers(model)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_freeze_is_bitwise_per_expert_under_adamw_with_weight_decay(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    layers = find_mlp_layers(model)
    bank = layers[0].experts
    capture = ActivationCapture(model, layers).attach()
    freezer = NeuronFreezer(capture)
    units = torch.tensor([1, 7, bank.size + 3])  # expert 0 units 1 and 7, expert 1 unit 3
    extra = [layers[0].dense_offset + 2] if layers[0].down is not None else []  # and a shared-expert unit
    freezer.freeze([torch.tensor(units.tolist() + extra), torch.zeros(0, dtype=torch.long)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(20):
        ids = torch.randint(5, 500, (4, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        freezer.restore()
    assert freezer.verify()
    gate_up = dict(model.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"]
    old = before["model.layers.0.mlp.experts.gate_up_proj"]
    size = bank.size
    for e, j in ((0, 1), (0, 7), (1, 3)):
        assert torch.equal(gate_up[e, j], old[e, j]) and torch.equal(gate_up[e, j + size], old[e, j + size])
    assert not torch.equal(gate_up[0, 2], old[0, 2]), "an unfrozen unit of the same expert must train"
    assert not torch.equal(gate_up[2, 1], old[2, 1]), "the same unit of another expert must train"
    down = dict(model.named_parameters())["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(down[0, :, 7], before["model.layers.0.mlp.experts.down_proj"][0, :, 7])
    assert not torch.equal(down[3, :, 7], before["model.layers.0.mlp.experts.down_proj"][3, :, 7])
    if extra:
        shared = layers[0].down
        assert torch.equal(shared.base.weight[:, 2], before[f"{shared.name}.weight"][:, 2])
    capture.remove()


def test_penalty_gradient_matches_the_hand_computed_gradient():
    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    layers = find_mlp_layers(model)
    bank = layers[1].experts  # the last layer: its units' gradient reaches its own gate/up rows directly
    units = torch.tensor([0, 3, bank.size + 5, 3 * bank.size + 9])
    capture = ActivationCapture(model, layers).attach()
    reference = torch.tensor([0.05, -0.02, 0.3, 0.1])
    penalty = ActivationPenalty([torch.zeros(0, dtype=torch.long), units], lambda: [torch.zeros(0), reference])
    penalty.active = True
    capture.add_tap(penalty)
    seen = {}
    handle = bank.module.register_forward_pre_hook(lambda m, a, k: seen.update(h=a[0].detach(), r=a[1].clone()), with_kwargs=True)
    ids, mask = _batch(2)
    model(input_ids=ids, attention_mask=mask)
    value = penalty.forward_loss()
    assert value is not None
    value.backward()
    handle.remove()
    capture.remove()

    # by hand: P = (1/n) sum_j ((m_j - r_j) / max(|r_j|, floor))^2, m_j = mean over sequences that routed to j's
    # expert of the max over those tokens of a = silu(g) * u, g = w_g . x, u = w_u . x
    hidden, routes = seen["h"].double(), seen["r"]  # float64 from here
    b, t = mask.shape
    w = bank.module.gate_up_proj.detach().double()
    grad_gate = torch.zeros_like(w)
    real = mask.reshape(-1).bool()
    for k, unit in enumerate(units.tolist()):
        e, j = divmod(unit, bank.size)
        g, u = hidden @ w[e, j], hidden @ w[e, j + bank.size]
        a = F.silu(g) * u
        routed = ((routes == e).any(-1) & real).view(b, t)
        peaks = [(s, int(torch.where(routed[s], a.view(b, t)[s], torch.tensor(-torch.inf, dtype=a.dtype)).argmax()))
                 for s in range(b) if routed[s].any()]
        m = sum(a.view(b, t)[s, i] for s, i in peaks) / len(peaks)
        scale = max(abs(float(reference[k])), penalty.floor)
        outer = 2 * (m - reference[k]) / scale**2 / units.numel() / len(peaks)
        for s, i in peaks:
            x, gi, ui = hidden.view(b, t, -1)[s, i], g.view(b, t)[s, i], u.view(b, t)[s, i]
            sig = torch.sigmoid(gi)
            grad_gate[e, j] += outer * ui * (sig * (1 + gi * (1 - sig))) * x  # d silu(g)/dg = s (1 + g (1 - s))
            grad_gate[e, j + bank.size] += outer * F.silu(gi) * x
    rows = torch.cat([units % bank.size, units % bank.size + bank.size])
    experts = torch.cat([units // bank.size] * 2)
    expected = grad_gate[experts, rows]
    assert expected.abs().max() > 0
    torch.testing.assert_close(bank.module.gate_up_proj.grad[experts, rows].double(), expected, rtol=1e-3, atol=1e-6)  # float32 model


def test_router_share_counts_routing_slots_to_safety_experts():
    model = tiny_model("olmoe").eval()
    layers = find_mlp_layers(model)
    capture = ActivationCapture(model, layers).attach()
    bank = layers[0].experts
    router = RouterCount(capture.sources, [ids for ids, _ in capture.split([torch.tensor([bank.size + 1]),
                                                                             torch.zeros(0, dtype=torch.long)])])  # expert 1 of layer 0
    capture.add_tap(router, on="probe")
    seen = {}
    handle = bank.module.register_forward_pre_hook(lambda m, a, k: seen.update(r=a[1].clone()), with_kwargs=True)
    ids, mask = _batch(3)
    with torch.no_grad(), capture.probing():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    counts = router.drain()
    real = mask.reshape(-1).bool()
    routes = seen["r"][real]
    assert counts is not None
    assert counts.tolist() == [float((routes == 1).sum()), float(routes.numel())]
    assert router.drain() is None
    model.train()
    model(input_ids=ids, attention_mask=mask)  # a training forward: the probe-only counter does not count it
    assert router.drain() is None
    capture.remove()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [False, True])
def test_sft_trainer_run_logs_metrics_for_every_moe_family(family, lora, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from rimguard import RIMGuard
    from rimguard.compat import no_checkpointing
    from rimguard.probes.reasoning import reasoning_texts
    from rimguard.testing import tiny_tokenizer

    model = tiny_model(family)
    tok = tiny_tokenizer()
    guard = RIMGuard(mode="regularize", probe_every=2, num_safety_probes=6, check_probes=6, margin_probes=2, kl_probes=2,
                     max_new_tokens=6, top_m=0.05, min_share=0.2, log_file="rimguard.jsonl", anchor_every=2)
    cfg = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                    bf16=False, use_cpu=True, max_length=64, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    **no_checkpointing())
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(reasoning_texts(16)), processing_class=tok,
                         callbacks=[guard], peft_config=LoraConfig(r=4, target_modules="all-linear") if lora else None)
    trainer.train()
    checks = [e for e in guard.history if "safety_drop" in e]
    assert checks, "no check logged metrics"
    last = checks[-1]
    for key in ("safety_drop", "ras_safe", "entanglement_z", "router_share", "router_share_drop", "router_share_train"):
        assert key in last and last[key] == last[key], (key, last)  # present and not NaN
    assert 0.0 <= last["router_share"] <= 1.0


def test_inspect_shows_the_safety_neurons_per_expert(tmp_path, capsys):
    from rimguard.atlas import NeuronAtlas
    from rimguard.cli import main
    from rimguard.probes import bundled
    from rimguard.testing import tiny_tokenizer

    model = tiny_model("qwen2_moe")
    atlas = NeuronAtlas.identify(model, tiny_tokenizer(), bundled("harmful")[:6], bundled("intent"), max_new_tokens=4,
                                 top_m=0.05, min_share=0.2, num_controls=4, progress=False)
    atlas.save(tmp_path / "atlas")
    assert main(["inspect", str(tmp_path / "atlas")]) == 0
    out = capsys.readouterr().out
    assert "neurons per expert" in out
    per_expert = NeuronAtlas.load(tmp_path / "atlas").per_expert()
    assert sum(sum(c.values()) for c in per_expert.values()) == atlas.num_safety  # every safety neuron is placed
    layer, counts = next(iter(per_expert.items()))
    assert f"  L{layer}: " + " ".join(f"{k}:{v}" for k, v in counts.items()) in out
    experts, width = 4, 32
    for (lay, unit) in atlas.safety_neurons().tolist():  # the expert of each neuron is its id over the expert width
        key = f"e{unit // width}" if unit < experts * width else "shared"
        assert per_expert[lay][key] >= 1


class _HostRead(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise _HostRead("a hook read a tensor on the host")


@pytest.mark.parametrize("family", ["qwen2_moe", "llama"])
def test_training_hooks_never_read_a_tensor_on_the_host(family, monkeypatch):
    """The stream, the penalty and the router count: no .item(), no bool(), no nonzero() inside a hook (no host sync)."""
    original = ActivationCapture._source_hook

    def guarded(self, pos):
        hook = original(self, pos)

        def run(module, args, kwargs):
            with pytest.MonkeyPatch.context() as mp:
                for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
                    mp.setattr(torch.Tensor, name, _refuse)
                return hook(module, args, kwargs)

        return run

    monkeypatch.setattr(ActivationCapture, "_source_hook", guarded)
    model = tiny_model(family).train()
    layers = find_mlp_layers(model)
    tracked = [torch.arange(0, layer.size, 7) for layer in layers]
    capture = ActivationCapture(model, layers, tracked).attach()
    router = RouterCount(capture.sources, [ids for ids, _ in capture.split(tracked)])
    stream = TaskStream(capture.source_tracked, masked_max_sum)
    capture.add_tap(stream)
    capture.add_tap(router)
    reference = [torch.full((ids.numel(),), 0.1) for ids, _ in capture.split(tracked)]
    penalty = ActivationPenalty([ids for ids, _ in capture.split(tracked)], lambda: reference)
    penalty.active = True
    capture.add_tap(penalty)
    ids, mask = _batch(4)
    for _ in range(2):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        (out.loss + penalty.forward_loss()).backward()
    sums, count = stream.drain()
    assert sums.shape == count.shape == (sum(t.numel() for t in tracked),) and bool((count > 0).any())
    if layers[0].experts is not None:
        assert router.drain() is not None
    capture.remove()
