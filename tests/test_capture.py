import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rimguard.hooks.arch import UnsupportedModelError, find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.hooks.reduce import get_reducer, masked_max, masked_max_sum
from rimguard.signals.stream import TaskStream
from rimguard.testing import FAMILIES, tiny_model


def _reference_intermediate(model, layers, ids, mask):
    """float64 masked max of the true down-projection inputs, via a separate hook."""
    seen = {}
    handles = [l.down.module.register_forward_pre_hook(
        lambda m, a, i=l.index: seen.__setitem__(i, a[0].detach().double())) for l in layers]
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    out = []
    for i in range(len(layers)):
        x = seen[i].masked_fill(~mask.bool()[..., None], float("-inf"))
        out.append(x.amax(1))
    return torch.cat(out, 1)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("lora", [False, True])
def test_capture_every_family(family, lora):
    model = tiny_model(family)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=family == "gpt2"))  # GPT-2: Conv1D
    layers = find_mlp_layers(model)
    assert len(layers) == 2 and all(l.size == 128 for l in layers)
    capture = ActivationCapture(model, layers, [None, None]).attach()
    ids = torch.randint(0, 500, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    model.eval()
    with torch.no_grad(), capture.probing(full=True) as rows:
        model(input_ids=ids, attention_mask=mask)
    capture.remove()
    ref = _reference_intermediate(model, layers, ids, mask)
    torch.testing.assert_close(rows[0].double(), ref, rtol=1e-5, atol=1e-6)
    # padding is excluded: changing padded tokens leaves the rows unchanged
    ids2 = ids.clone()
    ids2[1, 4:] = 3
    capture.attach()
    with torch.no_grad(), capture.probing(full=True) as rows2:
        model(input_ids=ids2, attention_mask=mask)
    capture.remove()
    torch.testing.assert_close(rows2[0][1], rows[0][1])


def test_unsupported_model_error_names_class():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="Weird.*decoder stack"):
        find_mlp_layers(Weird())


def test_masked_max_against_float64_reference_many_shapes():
    gen = torch.Generator().manual_seed(0)
    for b, t, i in [(1, 1, 1), (2, 5, 3), (4, 17, 33), (3, 64, 128)]:
        x = torch.randn(b, t, i, generator=gen)
        mask = (torch.rand(b, t, generator=gen) > 0.3).long()
        mask[0, 0] = 1
        mask[-1] = 0 if b > 1 else mask[-1]
        ref = x.double().masked_fill(~mask.bool()[..., None], float("-inf")).amax(1)
        ref = torch.where(mask.bool().any(1, keepdim=True), ref, torch.zeros_like(ref))
        torch.testing.assert_close(masked_max(x, mask).double(), ref)
        for share in (2, 16):  # many tracked neurons (max, then pick) and few (pick, then max)
            index = torch.randperm(i, generator=gen)[: max(1, i // share)]
            sums, count = masked_max_sum(x, mask, index)
            torch.testing.assert_close(sums.double(), ref[:, index].sum(0), rtol=1e-6, atol=1e-6)
            assert count.item() == mask.bool().any(1).sum().item()
        sums_nomask, count_nomask = get_reducer(torch.device("cpu"))(x, None, None)
        torch.testing.assert_close(sums_nomask.double(), x.double().amax(1).sum(0), rtol=1e-6, atol=1e-6)
        assert count_nomask.item() == b


def _stream(capture):
    stream = TaskStream(capture.source_tracked, masked_max_sum)
    capture.add_tap(stream, on="train")
    return stream


def _train_steps(model, stream, steps, checkpointing):
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 500, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
    return stream.drain()


def test_activation_checkpointing_does_not_double_count():
    calls = {"n": 0}
    results = []
    for ckpt in (False, True):
        model = tiny_model("llama")
        layers = find_mlp_layers(model)
        capture = ActivationCapture(model, layers, [torch.arange(128)] * 2).attach()
        fired = layers[0].down.module.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
        calls["n"] = 0
        results.append(_train_steps(model, _stream(capture), 3, ckpt))
        fired.remove()
        capture.remove()
        if ckpt:
            assert calls["n"] == 6  # the layer really ran twice per step (forward + recompute)
    (s0, c0), (s1, c1) = results
    assert c0.shape == s0.shape  # one count per tracked neuron
    assert (c0 == 6).all() and (c1 == 6).all()
    torch.testing.assert_close(s0, s1)


def test_hooks_fully_removed_and_no_activation_references():
    model = tiny_model("llama")
    layers = find_mlp_layers(model)
    capture = ActivationCapture(model, layers, [torch.arange(16)] * 2).attach()
    assert model._forward_pre_hooks and layers[0].down.module._forward_pre_hooks

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    stream = _stream(capture)
    _train_steps(model, stream, 5, False)
    stream.drain()
    before = live_tensors()
    for _ in range(100):
        _train_steps(model, stream, 1, False)
    stream.drain()
    after = live_tensors()
    assert after - before <= 2, (before, after)
    capture.remove()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert all(not l.down.module._forward_pre_hooks for l in layers)


def test_the_engine_walks_the_model_once_and_only_the_hook_layer_registers_hooks(tok, fast_config, monkeypatch):
    """Identification, monitor, regularizer and freeze share one capture: one find_mlp_layers walk,
    and every module or gradient hook is registered from rimguard/hooks/capture.py."""
    import inspect

    import rimguard.atlas.core
    import rimguard.engine
    from rimguard import GuardEngine
    from rimguard.hooks.arch import find_mlp_layers

    walks, callers = [], []

    def walk(model):
        walks.append(model)
        return find_mlp_layers(model)

    for module in (rimguard.engine, rimguard.atlas.core):
        monkeypatch.setattr(module, "find_mlp_layers", walk)

    def recording(real):
        def register(self, *args, **kwargs):
            callers.append(inspect.stack()[1].filename)
            return real(self, *args, **kwargs)
        return register

    for name in ("register_forward_pre_hook", "register_forward_hook"):
        monkeypatch.setattr(torch.nn.Module, name, recording(getattr(torch.nn.Module, name)))
    monkeypatch.setattr(torch.Tensor, "register_hook", recording(torch.Tensor.register_hook))
    engine = GuardEngine(fast_config(mode="freeze", regularizer="activation", level_actions={"ok": ["freeze", "regularize"]}))
    engine.setup(tiny_model("llama"), tok)
    assert engine.freezer.count > 0 and engine.tie.reg_lambda > 0
    ours = [c for c in callers if "/rimguard/" in c]
    assert len(walks) == 1
    assert ours and all(c.endswith("rimguard/hooks/capture.py") for c in ours), set(ours)
    engine.teardown()
    assert not engine.attached()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("lora", [False, True])
def test_probe_pass_stops_after_the_last_needed_layer_with_the_same_values(tok, family, lora):
    """A probe pass reads the tracked layers and stops: the later layers and the LM head never run,
    and the rows equal a float64 masked max over a plain, complete forward (every family, +/- LoRA)."""
    from rimguard.passes import activations, pad, pad_id, tokenize_dialogues

    model = tiny_model(family)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=family == "gpt2"))
    layers = find_mlp_layers(model)
    seqs = tokenize_dialogues(tok, ["how are tides made?", "name three birds", "why is the sky blue?"], ["Sure.", "", "Light."], 64)
    ran, seen = [], []
    handles = [model.get_output_embeddings().register_forward_hook(lambda *a: ran.append("lm_head")),
               layers[1].down.module.register_forward_hook(lambda *a: ran.append("layer 1"))]
    capture = ActivationCapture(model, layers, [torch.tensor([3, 7]), torch.zeros(0, dtype=torch.long)]).attach()
    got = activations(model, capture, seqs, pad_id(tok), batch_size=2)
    capture.remove()
    assert ran == [] and got.shape == (3, 2)
    handles.append(layers[0].down.module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double())))
    batch = pad(seqs, pad_id(tok))
    with torch.no_grad():
        model.eval()
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    x = seen[0][..., [3, 7]].masked_fill(~batch.attention_mask.bool()[..., None], float("-inf")).amax(1)
    torch.testing.assert_close(got.double(), x, rtol=1e-5, atol=1e-6)
    assert ran == ["layer 1", "lm_head"]  # the plain forward ran everything
