"""Tiny random models, a tokenizer and data, built offline in seconds (for tests and examples).

Nothing here downloads: the tokenizer is a byte-level BPE trained on the bundled probe texts,
and models are random initialisations from small configs of each supported family.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from rimguard.probes import bundled
from rimguard.probes.reasoning import problems

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# model_type -> extra config fields; every family is 2 layers, hidden 64, intermediate 128.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 16},
    "phi3": {},
    "olmo2": {},
    "gpt2": {},
}

# mixture-of-experts families: 4 experts, top-2 routing; each expert's width is moe_intermediate_size (32) or, for
# Mixtral and OLMoE, the intermediate size (128); Qwen2-MoE also has a shared expert of 96
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MOE_FAMILIES: dict[str, dict[str, Any]] = {
    "qwen3_moe": {**_MOE, "head_dim": 16, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {**_MOE},
    "qwen2_moe": {**_MOE, "decoder_sparse_step": 1, "mlp_only_layers": [], "shared_expert_intermediate_size": 96},
    # DeepSeek-V3: layer 0 dense, layer 1 routed experts plus one shared expert; multi-head latent attention
    "deepseek_v3": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "moe_intermediate_size": 32, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
}


# The tokenizer's training texts: the bundled sets it was first trained on. Sets bundled later (the reasoning
# spans) are left out, so that tokenization, and every tiny run tuned on it, stays the same.
CORPUS_SETS = ("harmful", "intent", "harmless", "refusals", "refusal_openings", "compliance_openings", "anchor_harmful",
               "anchor_harmless")


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 600-token byte-level BPE with a chat template and pad/eos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [line for name in CORPUS_SETS for line in bundled(name)]
    corpus += [p.question + " " + p.solution() for p in problems(200, seed=1)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    # input ids and attention mask only, as causal-LM tokenizers declare (no token_type_ids for generate to refuse)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(model_type: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int | None = None):
    """A small config of ``model_type`` (see :data:`FAMILIES` and :data:`MOE_FAMILIES`)."""
    tok = tiny_tokenizer()
    vocab = vocab or len(tok)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=layers, n_embd=hidden, n_inner=intermediate, n_head=4,
                                    vocab_size=vocab, n_positions=512, **ids)
    return AutoConfig.for_model(
        model_type, num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
        vocab_size=vocab, max_position_embeddings=512,
        **{"num_attention_heads": 4, "num_key_value_heads": 2, **ids, **FAMILIES.get(model_type, MOE_FAMILIES.get(model_type, {}))},
    )


def tiny_model(model_type: str = "llama", seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A randomly initialised causal LM of ``model_type`` in fp32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs))
    return model


# planted_heads_model: layer-0 heads with hand-set attention (layer, head)
PLANTED_HEAD = (0, 2)  # a refusal head: attends onto REFUSAL_MARKER, which only the 'harmful' prompts carry
SINK_HEAD = (0, 0)  # an attention sink: attends onto the first token of every prompt
REFUSAL_MARKER = "<|system|>"


def marked(prompts: list[str]) -> list[str]:
    """``prompts`` with :data:`REFUSAL_MARKER` appended (the 'harmful' side for :func:`planted_heads_model`)."""
    return [f"{p} {REFUSAL_MARKER}" for p in prompts]


def planted_heads_model(seed: int = 0) -> torch.nn.Module:
    """A tiny llama (:func:`tiny_model`) with two hand-set heads in layer 0 (4 heads of 16 dims, 2 key heads):

    * :data:`PLANTED_HEAD` (key head 1) attends onto :data:`REFUSAL_MARKER`: on :func:`marked` prompts it looks
      away from a reasoning span, on others it spreads its attention (what a refusal head does);
    * :data:`SINK_HEAD` (key head 0) attends onto the first token of every prompt (low span mass everywhere, no
      separation).

    Embedding dims 60-62 carry a constant, the marker flag and the first-token flag (``<|user|>``); each planted
    head's query reads the constant and its key one flag, in the lowest-frequency RoPE pair (dims 7 and 15),
    which turns by under 0.03 rad over 100 positions. The other heads keep their random weights.
    """
    const, marker_flag, first_flag, low, dim = 60, 61, 62, 7, 16
    tok = tiny_tokenizer()
    model = tiny_model("llama", seed=seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, const:] = 0
        emb[:, const] = 1.0
        emb[tok.convert_tokens_to_ids(REFUSAL_MARKER), marker_flag] = 1.0
        emb[tok.convert_tokens_to_ids("<|user|>"), first_flag] = 1.0
        attn = model.model.layers[0].self_attn
        q, k = attn.q_proj.weight, attn.k_proj.weight
        for (_, head), kv, flag in ((PLANTED_HEAD, 1, marker_flag), (SINK_HEAD, 0, first_flag)):
            q[head * dim : (head + 1) * dim] = 0
            q[head * dim + low, const] = 1.0
            k[kv * dim + low] = 0
            k[kv * dim + low + dim // 2] = 0
            k[kv * dim + low, flag] = 1.0
    return model


def assert_grad_difference(model: torch.nn.Module, with_term: dict[str, torch.Tensor], without: dict[str, torch.Tensor],
                           rtol: float, atol: float) -> None:
    """``with_term - without`` equals each parameter's ``.grad`` in ``model`` (the term's gradient alone),
    and the term reaches at least one parameter."""
    checked = 0
    for name, p in model.named_parameters():
        if name in with_term:
            expected = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(with_term[name] - without[name], expected, rtol=rtol, atol=atol)
            checked += int(expected.abs().sum() > 0)
    assert checked > 0, "the term reaches no parameter"
