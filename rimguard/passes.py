"""Probe passes: run the model on fixed prompts without disturbing training.

Every pass runs in eval mode under ``no_grad``, restores the previous train/eval mode, and
forks the RNG (CPU and CUDA), so a guarded run draws the same random numbers as an unguarded
one. Tokenization pads by hand with the tokenizer's pad id (or EOS), so the user's tokenizer is
never modified.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

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
    """Eval mode, no grad, forked RNG, and no MoE router logits (TRL turns them on for its load-balancing
    loss; a forward on a KV cache cannot compute that loss); all restored on exit."""
    was_training = model.training
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    router_logits = getattr(text, "output_router_logits", False)
    with forked_rng(), torch.no_grad():
        model.eval()
        if router_logits:
            text.output_router_logits = False
        try:
            yield
        finally:
            model.train(was_training)
            if router_logits:
                text.output_router_logits = router_logits


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


def tokenize_dialogues(tokenizer, prompts: Sequence[str], responses: Sequence[str] | None = None,
                       max_length: int | None = 256) -> list[list[int]]:
    """Token ids of chat-formatted prompt (+ response), truncated to ``max_length`` (None: whole)."""
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

    ``N`` is the capture's tracked neurons, or all neurons of all layers if ``full``. Forwards stop
    after the last layer the capture needs. The token prefix all sequences share (a chat template's
    system turn) runs once (see :func:`shared_prefix`); batches hold sequences of similar length.
    """
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # batches of similar length: little padding
    width = shared_prefix(model, sequences)
    with probe_mode(model):
        prefix = _Prefix.run(model, capture, sequences, width, full=full)
        with capture.probing(full=full, stop_early=True) as result:
            for group in tqdm(list(chunks(order, batch_size)), desc=desc, disable=desc is None, leave=False):
                batch = pad([sequences[i][width:] for i in group], pad_value).to(device)
                try:
                    model(**prefix.inputs(batch))
                except ProbeComplete:  # every layer the probe needs has been read: the rest is not computed
                    pass
    rows = prefix.combine(result[0])
    return rows[torch.argsort(torch.tensor(order, device=rows.device))]


MIN_SHARED_PREFIX = 4  # tokens; a shorter common prefix is not worth a forward of its own


def shared_prefix(model: nn.Module, sequences: Sequence[Sequence[int]]) -> int:
    """Tokens at the start of every sequence that a probe pass runs once, ``0`` for none.

    The longest common prefix of two or more sequences, less one token (every row keeps a token of
    its own), if at least :data:`MIN_SHARED_PREFIX` long. None for a model with a sliding attention
    window: there, a row's padding between the prefix and its own tokens would count against the window.
    """
    config = getattr(model, "config", None)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return 0
    if len(sequences) < 2:  # nothing to share
        return 0
    first, width = sequences[0], min(len(s) for s in sequences) - 1
    for seq in sequences[1:]:
        width = next((i for i in range(width) if seq[i] != first[i]), width)
    return width if width >= MIN_SHARED_PREFIX else 0


@dataclass
class _Prefix:
    """The shared prefix's KV cache and per-neuron maxima, and how a batch of suffixes runs on them."""

    width: int
    cache: Any = None
    key: str = "past_key_values"
    rows: torch.Tensor | None = None  # [1, N] maxima over the prefix's tokens (when a capture probed it)

    @classmethod
    def run(cls, model: nn.Module, capture: ActivationCapture | None, sequences: Sequence[Sequence[int]], width: int,
            full: bool = False) -> "_Prefix":
        """Run ``sequences[0][:width]`` once, through every layer (nothing when ``width`` is 0),
        probing it if ``capture`` is given."""
        if not width:
            return cls(0)
        ids = torch.tensor([list(sequences[0][:width])], device=model_device(model))
        with capture.probing(full=full) if capture is not None else nullcontext([]) as rows:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
        return cls(width, out[key], key, rows[0] if rows else None)

    def inputs(self, batch: Batch, left: bool = False, use_cache: bool = False) -> dict[str, Any]:
        """Model keywords for ``batch`` (suffixes, left- or right-padded) after the prefix: its cache
        (copied and repeated per row), the attention mask over prefix and suffix, explicit positions."""
        mask, rows = batch.attention_mask, batch.input_ids.shape[0]
        positions = (mask.cumsum(-1) - 1).clamp_min(0) if left else torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        if not self.width:
            return {"input_ids": batch.input_ids, "attention_mask": mask, "position_ids": positions, "use_cache": use_cache}
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return {"input_ids": batch.input_ids, "attention_mask": torch.cat([mask.new_ones(rows, self.width), mask], 1),
                "position_ids": positions + self.width, "use_cache": True, self.key: cache}

    def combine(self, suffix_rows: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` maxima over prefix and suffix tokens (every row has a suffix token, see :func:`shared_prefix`;
        a MoE unit with no routed token in one part takes the other part's value)."""
        return suffix_rows if self.rows is None else torch.fmax(suffix_rows, self.rows)


def continuation_logprobs(
    model: nn.Module, tokenizer, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8,
    max_length: int | None = None,
) -> torch.Tensor:
    """Teacher-forced ``log p(continuation | chat(prompt))`` summed over its tokens, ``[P, K]`` float32.

    Prompt plus the longest continuation stay within ``max_length`` and the model's context. See
    :func:`prompt_pass` for how each prompt runs once.
    """
    conts = token_lists(tokenizer, continuations)
    tokens = prompt_ids(model, tokenizer, prompts, max(len(c) for c in conts), max_length)
    return prompt_pass(model, tokens, conts, pad_id(tokenizer), batch_size).scores


def token_lists(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of plain ``texts`` (no special tokens); each must have at least one token."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if not ids or any(not c for c in ids):
        raise ValueError("every continuation must have at least one token")
    return ids


ResponseReader = Callable[[list[int], torch.Tensor, torch.Tensor], None]  # (rows, logp [B, R, V], mask [B, R])


@dataclass
class PromptPass:
    """What :func:`prompt_pass` read from each prompt's KV cache (rows in the order of its ``prompts``).

    Attributes:
        scores: ``[P, K]`` float32, teacher-forced ``log p(continuation | prompt)`` summed over its tokens.
        activations: ``[P, N]`` float32 per-sequence maxima over prompt plus response, or None.
        openings: per prompt, the token ids of its greedy opening (``opening`` tokens, cut after an EOS), or None.
    """

    scores: torch.Tensor
    activations: torch.Tensor | None = None
    openings: list[list[int]] | None = None


def prompt_pass(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    pad_value: int,
    batch_size: int = 8,
    capture: ActivationCapture | None = None,
    responses: Sequence[Sequence[int]] | None = None,
    read_responses: ResponseReader | None = None,
    opening: int = 0,
    eos: int | None = None,
) -> PromptPass:
    """Run each prompt once and read up to four things from its KV cache.

    Args:
        prompts: ``P`` prompts as token ids (chat-formatted).
        continuations: ``K`` token lists scored after every prompt (may be empty).
        capture, responses: with both, prompt ``p``'s ``responses[p]`` (e.g. the model's own response) also
            runs on from the cache, and the capture's per-sequence maxima over prompt plus response are
            returned: the activations of the sequence ``prompts[p] + responses[p]`` without running its
            prompt twice. The response's forward stops after the last layer the capture needs, unless
            ``read_responses`` needs its logits.
        read_responses: with ``responses``, called per batch as ``read_responses(rows, logp, mask)``: the
            log-softmax ``[B, R, V]`` float32 that predicts each response token (position ``r`` predicts
            ``responses[row][r]``) and its mask ``[B, R]`` (1 for a real token); ``rows`` index ``prompts``.
        opening, eos: also decode each prompt's greedy opening of ``opening`` tokens (stopping at ``eos``)
            on a copy of its cache.

    Prompts run in batches of similar length, left-padded with explicit position ids, so a row does
    not depend on the other rows of its batch. A continuation's first token is scored from the
    prompt's last logits; its later tokens in one short forward on the prompt's cache per
    continuation length (no padding; a continuation's last token is never fed).
    """
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups: dict[int, list[int]] = {}
    for j, cont in enumerate(continuations):
        if len(cont) > 1:
            groups.setdefault(len(cont), []).append(j)
    firsts = torch.tensor([c[0] for c in continuations], dtype=torch.long, device=device)
    probe = capture is not None and responses is not None
    width = shared_prefix(model, prompts)
    scores, acts, openings = [], [], [[] for _ in prompts]
    with probe_mode(model):
        prefix = _Prefix.run(model, capture if probe else None, prompts, width)
        for lo in range(0, len(order), batch_size):
            rows = order[lo : lo + batch_size]
            inputs = prefix.inputs(pad([prompts[i][width:] for i in rows], pad_value, left=True).to(device), left=True, use_cache=True)
            mask = inputs["attention_mask"]  # [B, prefix + suffix]
            start = mask.sum(-1, keepdim=True)  # [B, 1]: the first position after the prompt
            with capture.probing() if probe else nullcontext([]) as prompt_rows:  # type: ignore[union-attr]
                out = model(**inputs, logits_to_keep=1)
            key = "cache" if "cache" in out else "past_key_values"  # renamed in transformers 5.x
            cache, last = out[key], out.logits[:, -1].float().log_softmax(-1)  # [B, V]
            if opening:
                for row, ids in zip(rows, _greedy(model, copy.deepcopy(cache), key, mask, start, last, opening)):
                    openings[row] = ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids
            if responses is not None and (prompt_rows or read_responses is not None):
                batch = pad([responses[i] for i in rows], pad_value).to(device)
                head_max = prefix.combine(prompt_rows[0]) if prompt_rows else None
                maxima = _run_responses(model, capture if probe else None, copy.deepcopy(cache), key, mask, start, head_max,
                                        batch, last, None if read_responses is None else lambda lp, m: read_responses(rows, lp, m))
                if maxima is not None:
                    acts.append(maxima)
            score = last[:, firsts]  # [B, K]: each continuation's first token
            for n, (length, members) in enumerate(groups.items()):
                held = cache if n == len(groups) - 1 else copy.deepcopy(cache)
                score[:, members] += _later_tokens(model, held, key, mask, start, [continuations[j] for j in members])
            scores.append(score)
    unsort = torch.argsort(torch.tensor(order, device=device))
    return PromptPass(torch.cat(scores)[unsort], torch.cat(acts)[unsort] if acts else None, openings if opening else None)


def _greedy(model: nn.Module, cache: Any, key: str, mask: torch.Tensor, start: torch.Tensor, last: torch.Tensor,
            count: int) -> list[list[int]]:
    """``count`` greedy tokens after each prompt of the batch, from its ``cache`` (extended here) and its
    last log-probs ``last`` ``[B, V]``; the rows of a batch decode together, each at its own positions."""
    token = last.argmax(-1, keepdim=True)  # [B, 1]
    out = [token]
    for k in range(1, count):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        step = model(input_ids=token, attention_mask=mask, position_ids=start + k - 1, use_cache=True, **{key: cache})
        cache, token = step[key], step.logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, 1).tolist()


def _run_responses(model: nn.Module, capture: ActivationCapture | None, cache: Any, key: str, mask: torch.Tensor,
                   start: torch.Tensor, prompt_max: torch.Tensor | None, response: Batch, last: torch.Tensor,
                   read: Callable[[torch.Tensor, torch.Tensor], None] | None) -> torch.Tensor | None:
    """Run the response batch on from the prompts' ``cache`` (``mask`` ``[B, T]`` covers its tokens).

    With ``capture``: returns ``[B, N]`` per-row maxima over prompt (``prompt_max``) and response tokens
    (a row with an empty response keeps its prompt maxima); the forward stops after the last layer the
    capture needs unless ``read`` needs the logits. With ``read``: calls ``read(logp [B, R, V], mask [B, R])``,
    the log-probs predicting each response token (the first from the prompt's ``last`` log-probs).
    """
    width = response.input_ids.shape[1]
    if width == 0:
        return prompt_max
    positions = start + torch.arange(width, device=start.device)
    inputs = dict(input_ids=response.input_ids, attention_mask=torch.cat([mask, response.attention_mask], 1), position_ids=positions,
                  use_cache=True, **{key: cache})
    with capture.probing(stop_early=read is None) if capture is not None else nullcontext([]) as rows:
        try:
            out = model(**inputs)
        except ProbeComplete:
            out = None
    if read is not None and out is not None:  # position k of the response forward predicts response token k + 1
        read(torch.cat([last[:, None], out.logits[:, :-1].float().log_softmax(-1)], 1), response.attention_mask)
    if capture is None:
        return None
    has_response = response.attention_mask.any(-1, keepdim=True)
    return torch.where(has_response, torch.fmax(prompt_max, rows[0]), prompt_max)


def _later_tokens(model: nn.Module, cache: Any, key: str, mask: torch.Tensor, start: torch.Tensor,
                  conts: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, G]``: summed log-probs of tokens ``1..n-1`` of ``G`` continuations of one length ``n``,
    each after every prompt of the batch (``mask`` ``[B, T]`` covers the prompt ``cache``, which this extends)."""
    b, g, n = mask.shape[0], len(conts), len(conts[0])
    ids = torch.tensor(conts, device=start.device).repeat(b, 1)  # [B*G, n], row r: prompt r // G, continuation r % G
    cache.batch_repeat_interleave(g)
    full = torch.cat([mask.repeat_interleave(g, 0), mask.new_ones(b * g, n - 1)], 1)
    logits = model(input_ids=ids[:, :-1], attention_mask=full, position_ids=start.repeat_interleave(g, 0) + torch.arange(n - 1, device=start.device),
                   use_cache=True, **{key: cache}).logits
    return logits.float().log_softmax(-1).gather(2, ids[:, 1:, None]).sum((1, 2)).view(b, g)


def next_token_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Log-probabilities of every next token, ``[B, T, V]`` float32 (call inside :func:`probe_mode`)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits.float().log_softmax(-1)
