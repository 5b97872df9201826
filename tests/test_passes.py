import pytest
import torch
from peft import LoraConfig, get_peft_model

from rimguard.passes import continuation_logprobs, encode, format_prompt, prompt_ids
from rimguard.probes import bundled
from rimguard.testing import FAMILIES, tiny_model, tiny_tokenizer


def _reference(model, tok, prompt, continuation, head=None):
    """log p(continuation | prompt) from one unpadded, uncached forward of prompt (or its token ids
    ``head``) + continuation."""
    head = head if head is not None else encode(tok, format_prompt(tok, prompt))
    cont = list(tok(continuation, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([head + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(logp[len(head) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_continuation_scores_equal_separate_forwards(family):
    """One cached prompt pass for K continuations of different lengths, prompts of different
    lengths left-padded in one batch: every score equals its own unpadded forward."""
    tok, model = tiny_tokenizer(), tiny_model(family).eval()
    prompts = [p for p in bundled("harmful")[:5]] + ["Hi"]
    conts = ["I can't help with that.", "Sure", "Here is how you do it step by step:"]
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=4)
    assert got.shape == (len(prompts), len(conts))
    want = torch.tensor([[_reference(model, tok, p, c) for c in conts] for p in prompts])
    torch.testing.assert_close(got.double(), want.double(), atol=2e-4, rtol=1e-5)
    assert model.training is False


def test_cached_continuation_scores_with_lora():
    tok = tiny_tokenizer()
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["down_proj", "q_proj"], init_lora_weights=False))
    model.eval()
    got = continuation_logprobs(model, tok, ["How do I pick a lock?", "Hello"], ["No.", "Sure, here"], batch_size=2)
    want = torch.tensor([[_reference(model, tok, p, c) for c in ("No.", "Sure, here")] for p in ("How do I pick a lock?", "Hello")])
    torch.testing.assert_close(got.double(), want.double(), atol=2e-4, rtol=1e-5)


def test_empty_continuation_is_an_error():
    with pytest.raises(ValueError, match="at least one token"):
        continuation_logprobs(tiny_model("llama"), tiny_tokenizer(), ["Hi"], ["ok", ""])


@pytest.mark.parametrize("check_probes, margin_probes", [(5, 0), (5, 2), (40, 2)])
def test_check_and_margin_probes_bound_what_a_check_measures(tok, fast_config, llama_atlas, check_probes, margin_probes):
    """A check measures the first check_probes of the atlas' probes (all of them if it holds fewer), and
    scores the first margin_probes of those for the margin (0: no margin)."""
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.signals.monitor import EntanglementMonitor

    model = tiny_model("llama")
    capture = ActivationCapture(model, find_mlp_layers(model), llama_atlas.per_layer()).attach()
    config = fast_config(check_probes=check_probes, margin_probes=margin_probes)
    monitor = EntanglementMonitor(capture, tok, llama_atlas, config,
                                  refusal_openings=bundled("refusal_openings"), compliance_openings=bundled("compliance_openings"))
    monitor.start()
    try:
        measured = min(check_probes, config.atlas.num_safety_probes)
        assert monitor.probe_prompts() == list(llama_atlas.probe_prompts[:measured])
        assert sum(len(g.ids) for g in monitor.groups if g.responses is not None) + len(monitor.plain_sequences) == measured
        assert len(monitor.margin_prompts) == margin_probes
        assert (monitor.ref_margin is None) == (margin_probes == 0)
    finally:
        capture.remove()


def test_prompts_longer_than_the_context_are_cut_not_crashed():
    """GPT-2 has absolute position embeddings (512 in the tiny config): a 900-token prompt used to
    die with an IndexError in generate() and in the margin pass. Prompts now keep their end within
    max_length and the context, and no forward sees more tokens than allowed."""
    from rimguard.passes import generate, prompt_ids

    tok, model = tiny_tokenizer(), tiny_model("gpt2")
    long_prompt = "please explain " * 300 + "how tides work"
    assert len(encode(tok, format_prompt(tok, long_prompt))) > 512
    widths = []
    handle = model.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["attention_mask"].shape[-1]), with_kwargs=True)
    texts = generate(model, tok, [long_prompt, "hi"], max_new_tokens=4)
    scores = continuation_logprobs(model, tok, [long_prompt], ["I cannot", "Sure"], max_length=64)
    handle.remove()
    assert len(texts) == 2 and torch.isfinite(scores).all() and scores.shape == (1, 2)
    assert max(widths) <= 512
    cut = prompt_ids(model, tok, [long_prompt], reserve=4, max_length=64)[0]
    assert len(cut) == 60 and cut == encode(tok, format_prompt(tok, long_prompt))[-60:]


def _with_system_turn(tok):
    """A copy of ``tok`` whose chat template opens every prompt with the same system turn (a shared prefix)."""
    import copy

    tok = copy.deepcopy(tok)
    tok.chat_template = "<|system|>You answer briefly and carefully.<|end|>" + tok.chat_template
    return tok


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("system", [False, True])
def test_shared_prompt_check_equals_the_plain_check(family, lora, system):
    """The monitor's safety pass runs each margin prompt once (response and openings on its KV cache,
    the response's forward stopping after the last tracked layer), and with a system turn the prefix
    every prompt shares once. Its activations and refusal margin equal the plain check: every safety
    sequence in one complete, uncached forward, and every opening scored in its own unpadded forward
    (every family, +/- LoRA)."""
    from rimguard import GuardConfig, NeuronAtlas
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.passes import shared_prefix
    from rimguard.signals.monitor import EntanglementMonitor

    tok, model = tiny_tokenizer(), tiny_model(family)
    tok = _with_system_turn(tok) if system else tok
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                                 fan_in_fan_out=family == "gpt2"))
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:6], bundled("intent"), top_m=8, min_share=0.15, num_controls=2,
                                 max_new_tokens=6, max_length=128, progress=False)
    cap = 128 if system else 64  # 64: some prompts are cut to leave room for the openings and run apart from their sequence
    config = GuardConfig(num_safety_probes=6, margin_probes=4, probe_batch_size=3, max_length=cap, refusal_kl=False, witness_tokens=0)
    refusals, complies = ["I can't help with that.", "No"], ["Sure, here", "Step 1:"]
    capture = ActivationCapture(model, find_mlp_layers(model), atlas.per_layer())
    monitor = EntanglementMonitor(capture, tok, atlas, config, (), refusals, complies)
    groups = {(g.margin, g.responses is not None): g for g in monitor.groups}
    shared_prompts = groups[True, True].prompts  # margin prompts whose sequence starts with their prompt tokens share one pass
    margin_only = groups[True, False].prompts if (True, False) in groups else []
    shared = len(shared_prompts)
    windowed = family in ("gemma2", "gemma3_text", "mistral")  # sliding-window attention: no shared prefix
    assert (shared_prefix(model, shared_prompts) > 0) == (system and not windowed)
    assert shared >= 2 and shared + len(margin_only) == 4 and len(monitor.plain_sequences) == 6 - shared
    capture.attach()
    heads_run = []
    handle = model.get_output_embeddings().register_forward_hook(lambda *a: heads_run.append(1))
    got_acts, got_margin, _ = monitor._safety_pass()
    handle.remove()
    batches = -(-shared // 3) + -(-len(margin_only) // 3)
    lengths = len({len(c) for c in monitor.openings if len(c) > 1})  # one forward per opening length
    prefixes = sum(shared_prefix(model, h) > 0 for h in (shared_prompts, margin_only, monitor.plain_sequences))
    # the LM head runs for each shared prefix, prompt batch and opening length only, never for a response
    assert len(heads_run) == prefixes + batches * (1 + lengths)

    seqs = monitor.safety_sequences
    rows = []
    with torch.no_grad(), capture.probing() as result:  # complete forwards, one sequence each, no cache
        model.eval()
        for seq in seqs:
            model(input_ids=torch.tensor([seq]))
    capture.remove()
    want_acts = result[0].double().mean(0)
    torch.testing.assert_close(got_acts.double(), want_acts, rtol=1e-4, atol=1e-5)
    width = max(len(tok(c, add_special_tokens=False)["input_ids"]) for c in refusals + complies)
    for head in prompt_ids(model, tok, atlas.probe_prompts[:4], width, cap):  # prompts cut to leave room for the openings
        scores = [_reference(model, tok, None, c, head) for c in refusals + complies]
        rows.append(sum(scores[:2]) / 2 - sum(scores[2:]) / 2)
    assert got_margin == pytest.approx(sum(rows) / len(rows), abs=2e-4)


@pytest.mark.parametrize("chunk", [1 << 26, 1])
def test_batched_kl_equals_one_forward_per_probe(monkeypatch, chunk):
    """KL probes run in chunks of rows (all at once, or one row per chunk when the chunk budget is tiny):
    the KL equals the mean over probes of each probe's own KL from its own forward."""
    import rimguard.signals.monitor as mon
    from rimguard import GuardConfig, NeuronAtlas
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.passes import Batch, next_token_logprobs
    from rimguard.signals import metrics

    monkeypatch.setattr(mon, "KL_CHUNK_ELEMENTS", chunk)
    tok, model = tiny_tokenizer(), tiny_model("qwen2")
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:4], bundled("intent"), top_m=4, min_share=0.25, num_controls=2,
                                 max_new_tokens=4, max_length=128, progress=False)
    config = GuardConfig(num_safety_probes=4, margin_probes=0, kl_probes=5, probe_batch_size=4, kl_top_k=8, max_length=128)
    reasoning = ["What is 3 + 4?", "A train leaves at noon and travels 60 km at 30 km/h. When does it arrive?", "Halve 18.",
                 "Tom has 5 apples and eats 2. How many are left?", "Is 17 prime?"]
    capture = ActivationCapture(model, find_mlp_layers(model), atlas.per_layer()).attach()
    monitor = mon.EntanglementMonitor(capture, tok, atlas, config, reasoning)
    monitor.start()
    assert len(monitor._kl_chunks()) == (5 if chunk == 1 else 2)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    got = monitor._kl()
    capture.remove()
    want = []
    base_model = tiny_model("qwen2").eval()
    with torch.no_grad():
        model.eval()
        for r in range(5):
            row = Batch(monitor.kl_ids[r : r + 1], monitor.kl_mask[r : r + 1])
            top = next_token_logprobs(base_model, row).topk(8, dim=-1)
            want.append(metrics.topk_kl(top.values, top.indices, next_token_logprobs(model, row), row.attention_mask).item())
    assert got > 0 and got == pytest.approx(sum(want) / 5, rel=1e-4)


@pytest.mark.parametrize("left", [False, True])
def test_kl_rows_from_a_training_batch_keep_their_first_real_tokens_up_to_kl_max_length(left):
    import rimguard.signals.monitor as mon
    from rimguard import GuardConfig, NeuronAtlas
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture

    tok, model = tiny_tokenizer(), tiny_model("llama")
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:4], bundled("intent"), top_m=4, min_share=0.25, num_controls=2,
                                 max_new_tokens=4, max_length=128, progress=False)
    config = GuardConfig(num_safety_probes=4, margin_probes=0, kl_probes=2, kl_max_length=5, max_length=128)
    monitor = mon.EntanglementMonitor(ActivationCapture(model, find_mlp_layers(model), atlas.per_layer()), tok, atlas, config)
    ids = torch.arange(10, 40).view(3, 10)
    mask = torch.ones_like(ids)
    if left:
        mask[0, :3] = 0  # row 0 left-padded: its real tokens are the last 7
    else:
        mask[1, 7:] = 0
    assert monitor._keep_first_batch(model, (), {"input_ids": ids, "attention_mask": mask}) is False
    assert monitor.kl_ids is None  # kept only: no forward inside the training forward's hook
    monitor.before_update()  # after the step's backward, before its update: the base log-probs
    assert monitor.kl_ids.shape == (2, 5) and monitor.kl_base_logp.shape[:2] == (2, 5)
    want = ids[:2, -5:] if left else ids[:2, :5]
    assert torch.equal(monitor.kl_ids, want) and bool(monitor.kl_mask.all())
    # a batch no longer than kl_max_length is kept whole
    monitor._keep_first_batch(model, (), {"input_ids": ids[:, :4], "attention_mask": mask[:, :4]})
    monitor.before_update()
    assert torch.equal(monitor.kl_ids, ids[:2, :4])
