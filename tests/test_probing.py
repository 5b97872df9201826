import pytest
import torch
from peft import LoraConfig, get_peft_model

from rimguard.probes import bundled
from rimguard.probing import continuation_logprobs, encode, format_prompt
from rimguard.testing import FAMILIES, tiny_model, tiny_tokenizer


def _reference(model, tok, prompt, continuation):
    """log p(continuation | prompt) from one unpadded, uncached forward of prompt + continuation."""
    head = encode(tok, format_prompt(tok, prompt))
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


@pytest.mark.parametrize("margin_probes", [0, 2])
def test_margin_probes_bounds_or_disables_the_margin(tok, fast_config, llama_atlas, margin_probes):
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.signals.monitor import EntanglementMonitor

    model = tiny_model("llama")
    capture = ActivationCapture(model, find_mlp_layers(model))
    monitor = EntanglementMonitor(capture, tok, llama_atlas, fast_config(margin_probes=margin_probes),
                                  refusal_openings=bundled("refusal_openings"), compliance_openings=bundled("compliance_openings"))
    monitor.start()
    try:
        assert len(monitor.margin_prompts) == margin_probes
        assert (monitor.ref_margin is None) == (margin_probes == 0)
    finally:
        monitor.stop()


def test_prompts_longer_than_the_context_are_cut_not_crashed():
    """GPT-2 has absolute position embeddings (512 in the tiny config): a 900-token prompt used to
    die with an IndexError in generate() and in the margin pass. Prompts now keep their end within
    max_length and the context, and no forward sees more tokens than allowed."""
    from rimguard.probing import generate, prompt_ids

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
