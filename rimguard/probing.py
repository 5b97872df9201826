"""Probe passes: run the model on fixed prompts without disturbing training.

Every pass runs in eval mode under ``no_grad``, restores the previous train/eval mode, and
forks the RNG (CPU and CUDA), so a guarded run draws the same random numbers as an unguarded
one. Tokenization pads by hand with the tokenizer's pad id (or EOS), so the user's tokenizer is
never modified.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from rimguard.hooks.capture import ActivationCapture, ProbeComplete


@dataclass
class Batch:
    """Right-padded token batch: ``input_ids`` and ``attention_mask`` are ``[B, T]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def format_prompt(tokenizer, prompt: str) -> str:
    """The user turn plus the assistant header: chat template if the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return f"User: {prompt}\nAssistant:"


def encode(tokenizer, text: str) -> list[int]:
    special = not getattr(tokenizer, "chat_template", None)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def context_size(model: nn.Module) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``/``n_positions``), if it states one."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_ids(model: nn.Module, tokenizer, prompts: Sequence[str], reserve: int, max_length: int | None = None) -> list[list[int]]:
    """Token ids of chat-formatted ``prompts``, each cut to leave ``reserve`` tokens (the response or the
    scored continuation) within ``max_length`` and the model's context. A long prompt keeps its *end*
    (the question and the assistant header) and loses its beginning."""
    limits = [n for n in (max_length, context_size(model)) if n is not None]
    budget = max(1, min(limits) - reserve) if limits else None
    ids = [encode(tokenizer, format_prompt(tokenizer, p)) for p in prompts]
    return [seq[-budget:] if budget is not None else seq for seq in ids]


def pad(sequences: Sequence[Sequence[int]], pad_value: int, left: bool = False) -> Batch:
    """Pad token lists into a :class:`Batch` (right padding unless ``left``)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return Batch(ids, mask)


@contextmanager
def forked_rng() -> Iterator[None]:
    """Run the block on a fork of the CPU (and current CUDA) RNG: the training run draws the same numbers."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, forked RNG; the previous mode is restored on exit."""
    was_training = model.training
    with forked_rng(), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_ids(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8, desc: str | None = None,
    max_length: int | None = None,
) -> list[list[int]]:
    """Token ids of the greedy responses to chat-formatted ``prompts``, up to and including the first EOS.

    Prompt plus response stay within ``max_length`` tokens and the model's context (see :func:`prompt_ids`)."""
    device, pid = model_device(model), pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    outputs: list[list[int]] = []
    with probe_mode(model):
        for group in tqdm(list(chunks(prompts, batch_size)), desc=desc, disable=desc is None, leave=False):
            batch = pad(prompt_ids(model, tokenizer, group, max_new_tokens, max_length), pid, left=True).to(device)
            out = model.generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pid,
            )
            for row in out[:, batch.input_ids.shape[1] :].tolist():
                outputs.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return outputs


def generate(
    model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8, desc: str | None = None,
    max_length: int | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted ``prompts`` (decoded, special tokens stripped); lengths as in
    :func:`generate_ids`."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, desc, max_length)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


def tokenize_dialogues(tokenizer, prompts: Sequence[str], responses: Sequence[str] | None = None, max_length: int = 256) -> list[list[int]]:
    """Token ids of chat-formatted prompt (+ response), truncated to ``max_length``."""
    responses = responses if responses is not None else [""] * len(prompts)
    return [encode(tokenizer, format_prompt(tokenizer, p) + r)[:max_length] for p, r in zip(prompts, responses)]


def activations(
    model: nn.Module,
    capture: ActivationCapture,
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    batch_size: int = 8,
    full: bool = False,
    desc: str | None = None,
) -> torch.Tensor:
    """Per-sequence max-over-tokens activations, ``[P, N]`` float32 on the model's device.

    ``N`` is the capture's tracked neurons, or all neurons of all layers if ``full``.
    """
    device = model_device(model)
    with probe_mode(model), capture.probing(full=full, stop_early=True) as result:
        for group in tqdm(list(chunks(sequences, batch_size)), desc=desc, disable=desc is None, leave=False):
            batch = pad(group, pad_value).to(device)
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            except ProbeComplete:  # every layer the probe needs has been read: the rest is not computed
                pass
    return result[0]


def continuation_logprobs(
    model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8,
    max_length: int | None = None,
) -> torch.Tensor:
    """Teacher-forced ``log p(continuation | chat(prompt))`` summed over its tokens, ``[P, K]`` float32.

    Prompt plus the longest continuation stay within ``max_length`` and the model's context.
    Each prompt runs once: its KV cache is repeated for the ``K`` continuations, which are then
    scored together in one short forward. Prompts are left-padded with explicit position ids, so
    a row's score does not depend on the other rows in its batch.
    """
    device, pid = model_device(model), pad_id(tokenizer)
    conts = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
    if any(not c for c in conts):
        raise ValueError("every continuation must have at least one token")
    k, width = len(conts), max(len(c) for c in conts)
    tail = pad(conts, pid).to(device)  # [K, L] right-padded
    rows = []
    with probe_mode(model):
        for group in chunks(prompts, batch_size):
            head = pad(prompt_ids(model, tokenizer, group, width, max_length), pid, left=True).to(device)
            b = head.input_ids.shape[0]
            out = model(input_ids=head.input_ids, attention_mask=head.attention_mask,
                        position_ids=(head.attention_mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)  # [B, V]: the continuation's first token
            key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
            cache = out[key]
            cache.batch_repeat_interleave(k)
            mask = torch.cat([head.attention_mask.repeat_interleave(k, 0), tail.attention_mask.repeat(b, 1)], 1)
            start = head.attention_mask.sum(-1).repeat_interleave(k, 0)[:, None]
            ids = tail.input_ids.repeat(b, 1)  # [B*K, L]
            logp = model(input_ids=ids, attention_mask=mask, position_ids=start + torch.arange(width, device=device),
                         use_cache=True, **{key: cache}).logits.float().log_softmax(-1)
            score = first.repeat_interleave(k, 0).gather(1, ids[:, :1]).squeeze(1)
            later = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # [B*K, L-1]
            score = score + (later * tail.attention_mask[:, 1:].repeat(b, 1)).sum(1)
            rows.append(score.view(b, k))
    return torch.cat(rows)


def next_token_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probabilities of every next token, ``[B, T, V]`` float32 (call inside :func:`probe_mode`)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.float().log_softmax(-1)
