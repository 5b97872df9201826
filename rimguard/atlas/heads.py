"""Refusal attention heads: prompts with a reasoning span before the answer, and the attention of the
answer position on that span.

Each prompt becomes ``chat(prompt) + reasoning span + "\\n\\n"`` (the span ``k % len(spans)`` of the
given reasoning passages, as if the assistant had thought first); the answer position is the last
token, where the first answer token is predicted. One forward per prompt (left-padded batches, so the
answer position is the last column of every row) gives, through :class:`rimguard.hooks.attention.AttentionRows`,
each head's attention row there; :mod:`rimguard.atlas.head_selection` turns the rows into span masses
and picks the heads.

Cost: identification is one forward over the harmful and one over the harmless prompts (no
generation); a monitor check is one forward over its probes, stopped after the last layer that holds
a monitored head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from rimguard.atlas.head_selection import HeadSelection, span_mass, top_in_span
from rimguard.hooks.arch import MLPLayer
from rimguard.hooks.attention import AttentionRows
from rimguard.hooks.capture import ProbeComplete
from rimguard.passes import chunks, model_device, pad, pad_id, probe_mode, prompt_ids

CLOSE = "\n\n"  # between the reasoning span and the answer; its last token is the answer position


@dataclass
class SpanPrompts:
    """Token ids of prompts with a reasoning span: ``sequences[i]`` holds the span at ``spans[i] = (start, end)``
    (end exclusive), followed by :data:`CLOSE`."""

    sequences: list[list[int]]
    spans: list[tuple[int, int]]

    def __getitem__(self, items: slice) -> "SpanPrompts":
        return SpanPrompts(self.sequences[items], self.spans[items])

    def __len__(self) -> int:
        return len(self.sequences)


def with_reasoning(model: nn.Module, tokenizer, prompts: Sequence[str], reasoning: Sequence[str], max_length: int) -> SpanPrompts:
    """Chat-formatted ``prompts``, each followed by reasoning passage ``k % len(reasoning)`` and :data:`CLOSE`.

    The pieces are tokenized separately (so the span's tokens are exact); a span longer than half of
    ``max_length`` is cut to it, and a long prompt keeps its end (as :func:`rimguard.passes.prompt_ids`).
    """
    if not reasoning:
        raise ValueError("no reasoning passages given")
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    close = encode(CLOSE)
    spans = [encode(text)[: max_length // 2] for text in reasoning]
    heads = prompt_ids(model, tokenizer, prompts, max(len(s) for s in spans) + len(close), max_length)
    out = SpanPrompts([], [])
    for k, head in enumerate(heads):
        span = spans[k % len(spans)]
        out.sequences.append(head + span + close)
        out.spans.append((len(head), len(head) + len(span)))
    return out


def answer_attention(model: nn.Module, layers: Sequence[MLPLayer], prompts: SpanPrompts, pad_value: int,
                     record: Sequence[int] | None = None, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's attention at the answer position, reduced over the span.

    Args:
        layers: the model's decoder layers (:func:`rimguard.hooks.arch.find_mlp_layers`).
        record: decoder layers to read (default all); the forward stops after the last of them.

    Returns:
        ``(mass [P, L_rec, H], top_in_span [P, L_rec, H] bool)`` on the model's device: the share of the
        answer position's attention on the span (float32, in [0, 1]), and whether its most-attended key
        lies in the span.
    """
    device = model_device(model)
    rows = AttentionRows(model, layers, record, stop_early=True)
    masses, tops = [], []
    with probe_mode(model), rows.installed():
        for group in chunks(prompts, batch_size):
            batch = pad(group.sequences, pad_value, left=True).to(device)
            shift = batch.input_ids.shape[1] - batch.attention_mask.sum(1)  # [B] left padding of each row
            spans = torch.tensor(group.spans, dtype=torch.long, device=device) + shift[:, None]
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp_min(0), use_cache=False)
            except ProbeComplete:  # every recorded layer has been read
                pass
            r = rows.take()
            masses.append(span_mass(r, spans))
            tops.append(top_in_span(r, spans))
    return torch.cat(masses), torch.cat(tops)


def identify_heads(model: nn.Module, layers: Sequence[MLPLayer], tokenizer, harmful: Sequence[str], harmless: Sequence[str],
                   reasoning: Sequence[str], k: int, max_length: int, batch_size: int = 8) -> HeadSelection:
    """The ``k`` refusal heads of ``model`` (rule: :mod:`rimguard.atlas.head_selection`), from one forward over
    ``harmful`` (refused) and one over ``harmless`` (answered) prompts, each with a reasoning span."""
    pid = pad_id(tokenizer)
    refuse, top = answer_attention(model, layers, with_reasoning(model, tokenizer, harmful, reasoning, max_length), pid,
                                   batch_size=batch_size)
    comply, _ = answer_attention(model, layers, with_reasoning(model, tokenizer, harmless, reasoning, max_length), pid,
                                 batch_size=batch_size)
    return HeadSelection.of(refuse.cpu(), comply.cpu(), top.cpu(), k)
