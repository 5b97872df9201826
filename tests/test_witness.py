"""The behavioural witnesses: refusal_kl and probe_refusal equal a hand computation, leave the other
signals unchanged, are logged by a guarded SFTTrainer run, and measure only the monitor's own probes."""

import math

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, NeuronAtlas, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.hooks.arch import find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.passes import encode, format_prompt
from rimguard.probes import bundled
from rimguard.probes.reasoning import reasoning_texts
from rimguard.signals import metrics
from rimguard.signals.monitor import EntanglementMonitor
from rimguard.testing import tiny_model, tiny_tokenizer

TOKENS = 5


def _monitor(model, tok, atlas, **kw):
    config = GuardConfig(**{"num_safety_probes": 6, "check_probes": 6, "margin_probes": 2, "probe_batch_size": 4, "max_length": 64,
                            "kl_top_k": 8, "witness_tokens": TOKENS, **kw})
    capture = ActivationCapture(model, find_mlp_layers(model), atlas.per_layer()).attach()
    monitor = EntanglementMonitor(capture, tok, atlas, config, (), bundled("refusal_openings")[:2], bundled("compliance_openings")[:2])
    return monitor, capture


def _ready(monitor, atlas):
    monitor.ema_task = monitor.ref_task = torch.ones(atlas.tracked.shape[0])  # no training stream in these tests


@pytest.fixture(scope="module")
def setting():
    tok, model = tiny_tokenizer(), tiny_model("qwen2")
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:6], bundled("intent"), top_m=6, min_share=0.25, num_controls=2,
                                 max_new_tokens=6, max_length=128, progress=False)
    return tok, atlas


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_refusal_kl_equals_the_hand_computed_kl(setting):
    tok, atlas = setting
    model = tiny_model("qwen2")
    monitor, capture = _monitor(model, tok, atlas)
    monitor.start()
    base = tiny_model("qwen2").eval()
    _perturb(model)
    _ready(monitor, atlas)
    got = monitor.measure()["refusal_kl"]
    capture.remove()
    witnessed = sorted(i for g in monitor.groups if g.responses is not None for i in g.ids)
    assert witnessed == [1, 2, 3, 4, 5]  # probe 0 is cut by max_length (64 tokens): its response is not all there
    per_probe = []
    for prompt, response in [(atlas.probe_prompts[i], atlas.probe_responses[i]) for i in witnessed]:  # one complete forward each
        head = encode(tok, format_prompt(tok, prompt))
        seq = encode(tok, format_prompt(tok, prompt) + response)[:64]
        ids, width = torch.tensor([seq]), len(seq) - len(head)
        with torch.no_grad():
            model.eval()
            now = model(input_ids=ids).logits[0, len(head) - 1 : len(seq) - 1].double().log_softmax(-1)
            then = base(input_ids=ids).logits[0, len(head) - 1 : len(seq) - 1].double().log_softmax(-1).topk(8, dim=-1)
        assert width > 0
        per_probe.append(float(metrics.topk_kl(then.values[None], then.indices[None], now[None])))
    assert got > 0 and got == pytest.approx(sum(per_probe) / len(per_probe), rel=1e-3, abs=1e-6)


def test_probe_refusal_is_the_judged_share_of_greedy_openings_with_its_interval(setting):
    tok, atlas = setting
    model = tiny_model("qwen2")
    calls = []

    def judge(text):  # a replaceable judge: here, "refusal" when the opening has an even number of characters
        calls.append(text)
        return len(text) % 2 == 0

    config = GuardConfig(num_safety_probes=6, check_probes=6, margin_probes=2, probe_batch_size=4, max_length=64, witness_tokens=TOKENS)
    capture = ActivationCapture(model, find_mlp_layers(model), atlas.per_layer()).attach()
    monitor = EntanglementMonitor(capture, tok, atlas, config, (), bundled("refusal_openings")[:2], bundled("compliance_openings")[:2],
                                  judge=judge)
    monitor.start()
    base_calls = list(calls)
    _perturb(model)
    calls.clear()
    _ready(monitor, atlas)
    values = monitor.measure()
    capture.remove()
    texts = []
    model.eval()
    witnessed = sorted(i for g in monitor.groups if g.responses is not None for i in g.ids)
    for prompt in [atlas.probe_prompts[i] for i in witnessed]:  # greedy decoding with generate(), one prompt at a time
        ids = torch.tensor([encode(tok, format_prompt(tok, prompt))])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()
        out = out[: out.index(tok.eos_token_id) + 1] if tok.eos_token_id in out else out
        texts.append(tok.decode(out, skip_special_tokens=True))
    assert sorted(calls) == sorted(texts)
    refused, n = sum(len(t) % 2 == 0 for t in texts), len(texts)
    assert values["probe_refusal"] == refused / n and values["probe_refusal_n"] == n == 5
    lo, hi = metrics.wilson(refused, n)
    assert (values["probe_refusal_lo"], values["probe_refusal_hi"]) == pytest.approx((lo, hi))
    assert values["probe_refusal_drop"] == pytest.approx(sum(len(t) % 2 == 0 for t in base_calls) / n - refused / n)


def test_wilson_interval_hand_computed():
    lo, hi = metrics.wilson(8, 10)  # p = 0.8, z = 1.96: centre 0.7137..., half-width 0.2183...
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert all(math.isnan(v) for v in metrics.wilson(0, 0))


def test_witnesses_leave_the_other_signals_unchanged(setting):
    tok, atlas = setting
    values = []
    for witness in (dict(refusal_kl=False, witness_tokens=0), dict(refusal_kl=True)):
        model = tiny_model("qwen2")
        monitor, capture = _monitor(model, tok, atlas, **witness)
        monitor.start()
        _perturb(model)
        _ready(monitor, atlas)
        values.append(monitor.measure())
        capture.remove()
    off, on = values
    assert "refusal_kl" not in off and "probe_refusal" not in off and "refusal_kl" in on and "probe_refusal" in on
    for key in ("safety_drop", "ras_safe", "refusal_margin", "refusal_drop"):
        assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-6), key


def test_a_guarded_sft_run_logs_the_witnesses_at_each_check_on_the_monitor_probes_only(tmp_path, tok, fast_config, llama_atlas):
    guard = RIMGuard(fast_config(mode="regularize", probe_every=2), atlas=llama_atlas)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-3, report_to=[],
                     bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(reasoning_texts(16)),
                         processing_class=tok, callbacks=[guard])
    trainer.train()
    assert [h["step"] for h in guard.history] == [1, 2, 4]
    witnessed = {i for g in guard.engine.monitor.groups if g.responses is not None for i in g.ids}
    for h in guard.history:
        assert h["refusal_kl"] >= 0 and 0 <= h["probe_refusal_lo"] <= h["probe_refusal"] <= h["probe_refusal_hi"] <= 1
        assert h["probe_refusal_n"] == len(witnessed) >= 6
    assert witnessed <= set(range(len(guard.engine.monitor.probe_prompts())))  # only the monitor's check probes
    anchor = set(guard.engine.regularizer.record.prompts)
    assert anchor and not anchor & set(guard.engine.monitor.probe_prompts())  # which the anchor never trains on
