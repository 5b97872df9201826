"""Held-out evaluation of a model: the one module the demo, the alignment build and the benchmarks use.

* :func:`judged` - greedy completions of prompts, judged by the string judge
  (:mod:`rimguard.signals.judge`): refusal, compliance and degenerate output, counted apart;
* :func:`refusal` - refusal rate on harmful prompts (higher is safer), :func:`over_refusal` - refusal
  rate on safe prompts (lower is better), both with their count, Wilson interval and samples;
* :func:`completion_examples` and :func:`heldout_loss` - the task loss on held-out prompt/completion
  records, tokenized as TRL's ``SFTTrainer`` does;
* :func:`accuracy` - exact-match accuracy of the final number of greedy answers (GSM8K style).

Every pass runs under :func:`rimguard.passes.probe_mode` (eval mode, no grad, RNG forked, mode restored).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

from rimguard.passes import generate, model_device, pad, probe_mode
from rimguard.signals.judge import judge, refusal_rate
from rimguard.signals.metrics import wilson


def judged(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 24, batch_size: int = 16,
           keep: int = 0, desc: str | None = None) -> dict[str, Any]:
    """Greedy completions of ``prompts`` and their judgments.

    Returns ``n``, the counts ``refusal``/``compliance``/``garbage``, their rates (``*_rate``), the
    refusal rate's Wilson 95% interval (``refusal_lo``, ``refusal_hi``) and, if ``keep``, the first
    ``keep`` ``samples`` (prompt, completion, verdict): read them, the judge is a string matcher.
    """
    texts = generate(model, tokenizer, list(prompts), max_new_tokens, batch_size, desc=desc) if prompts else []
    out: dict[str, Any] = refusal_rate(texts)
    out["refusal_lo"], out["refusal_hi"] = wilson(out["refusal"], out["n"])
    if keep:
        out["samples"] = [{"prompt": p, "completion": t, "verdict": judge(t)} for p, t in zip(prompts, texts)][:keep]
    return out


def refusal(model: torch.nn.Module, tokenizer: Any, harmful: Sequence[str], max_new_tokens: int = 24, batch_size: int = 16,
            keep: int = 0) -> dict[str, Any]:
    """Refusal of held-out harmful prompts: ``refusal_rate`` (with ``refusal_lo``/``refusal_hi``), ``garbage_rate``
    (degenerate loops, counted apart from compliance), ``n_harmful``; see :func:`judged`."""
    got = judged(model, tokenizer, harmful, max_new_tokens, batch_size, keep)
    out = {"refusal_rate": got["refusal_rate"], "refusal_lo": got["refusal_lo"], "refusal_hi": got["refusal_hi"],
           "garbage_rate": got["garbage_rate"], "n_harmful": got["n"]}
    if keep:
        out["samples_harmful"] = got["samples"]
    return out


def over_refusal(model: torch.nn.Module, tokenizer: Any, safe: Sequence[str], max_new_tokens: int = 24, batch_size: int = 16,
                 keep: int = 0) -> dict[str, Any]:
    """Refusal of safe prompts (XSTest's safe set): ``over_refusal`` (with ``over_refusal_lo``/``_hi``),
    ``xstest_garbage_rate``, ``n_xstest``; see :func:`judged`."""
    got = judged(model, tokenizer, safe, max_new_tokens, batch_size, keep)
    out = {"over_refusal": got["refusal_rate"], "over_refusal_lo": got["refusal_lo"], "over_refusal_hi": got["refusal_hi"],
           "xstest_garbage_rate": got["garbage_rate"], "n_xstest": got["n"]}
    if keep:
        out["samples_xstest"] = got["samples"]
    return out


def completion_examples(tokenizer: Any, records: Sequence[dict[str, Any]], max_length: int) -> list[tuple[list[int], int]]:
    """``(ids, prompt_len)`` of conversational prompt/completion records, tokenized like TRL's
    ``SFTTrainer`` does (chat template on prompt and on prompt + completion; loss on the
    completion only), truncated to ``max_length``."""
    out = []
    for rec in records:
        prompt = tokenizer.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(list(rec["prompt"]) + list(rec["completion"]), tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite the prompt part: fall back to appending
            full = prompt + rec["completion"][0]["content"]
        p_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
        if ids[: len(p_ids)] != p_ids:  # tokenization merged across the boundary: re-tokenize the tail
            ids = p_ids + list(tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"])
        out.append((ids[:max_length], min(len(p_ids), max_length)))
    return out


def heldout_loss(model: torch.nn.Module, examples: Sequence[tuple[list[int], int]], pad_value: int, batch_size: int = 8) -> float:
    """Mean next-token NLL over all completion tokens of ``examples`` (token-weighted), in nats."""
    device = model_device(model)
    total, count = 0.0, 0
    with probe_mode(model):
        for start in range(0, len(examples), batch_size):
            group = examples[start : start + batch_size]
            batch = pad([ids for ids, _ in group], pad_value).to(device)
            labels = batch.input_ids.clone()
            labels[batch.attention_mask == 0] = -100
            for row, (_, plen) in enumerate(group):
                labels[row, :plen] = -100
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            logp = logits[:, :-1].log_softmax(-1)
            target = labels[:, 1:]
            keep = target != -100
            picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            total += float(-(picked * keep).sum())
            count += int(keep.sum())
    return total / count if count else math.nan


def final_number(text: str) -> str | None:
    """The last number in ``text`` (commas and a trailing period dropped), or None."""
    found = re.findall(r"-?\d[\d,]*\.?\d*", text.replace("$", ""))
    return found[-1].replace(",", "").rstrip(".") if found else None


def accuracy(model: torch.nn.Module, tokenizer: Any, questions: Sequence[str], answers: Sequence[str], max_new_tokens: int = 200,
             batch_size: int = 50, keep: int = 0) -> dict[str, Any]:
    """Exact-match accuracy of the final number of greedy answers to ``questions`` against ``answers`` (numbers
    as text): ``accuracy``, ``n_accuracy`` and, if ``keep``, ``samples_accuracy``."""
    texts = generate(model, tokenizer, list(questions), max_new_tokens, batch_size)
    right = [final_number(t) == final_number(a) for t, a in zip(texts, answers)]
    out: dict[str, Any] = {"accuracy": sum(right) / len(right) if right else math.nan, "n_accuracy": len(right)}
    if keep:
        out["samples_accuracy"] = [{"question": q, "completion": t, "correct": c} for q, t, c in zip(questions, texts, right)][:keep]
    return out

