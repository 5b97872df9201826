"""In-process evaluation at chosen optimizer steps (no checkpoints written).

* :func:`eval_schedule` - the eval points, dense at the start because forgetting is fast.
* :class:`Evaluator` - refusal rate on held-out harmful prompts, over-refusal on XSTest safe
  prompts (batched greedy generation, string-match judge) and held-out GSM8K loss.
* :class:`EvalPoints` - a ``TrainerCallback`` that calls a function at those steps, with the model
  in eval mode under ``no_grad`` (train mode restored after), and measures how long it took so
  the step timer can leave evaluation out.
* :class:`StepTimer` - wall time of each optimizer step, guard work included, evaluation excluded.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import TrainerCallback

DENSE = (0, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def eval_schedule(max_steps: int, minimum: int = 8) -> list[int]:
    """Eval points in ``[0, max_steps]``: ``0, 2, 4, 8, 12, 16, 24, 32, 48, 64, ...`` (up to
    ``max_steps``), plus ``max_steps``; if that gives fewer than ``minimum`` points, steps are
    added in the widest gaps (the earliest first) until it does (or every step is a point)."""
    if max_steps < 1:
        raise ValueError("max_steps must be >= 1")
    points = sorted({s for s in DENSE if s <= max_steps} | {0, max_steps})
    while len(points) < min(minimum, max_steps + 1):
        gaps = [(b - a, a, b) for a, b in zip(points, points[1:]) if b - a > 1]
        width, a, b = max(gaps, key=lambda g: (g[0], -g[1]))
        points = sorted(set(points) | {a + width // 2})
    return points


def parse_steps(text: str | Sequence[int] | None, max_steps: int) -> list[int]:
    """``"0,4,8"`` or a list -> sorted unique steps within ``[0, max_steps]`` (0 and max added)."""
    if text is None:
        return eval_schedule(max_steps)
    items = [int(s) for s in text.split(",") if s.strip()] if isinstance(text, str) else [int(s) for s in text]
    bad = [s for s in items if s < 0 or s > max_steps]
    if bad:
        raise ValueError(f"eval steps {bad} are outside [0, {max_steps}]")
    return sorted(set(items) | {0, max_steps})


# -- held-out loss ----------------------------------------------------------------------------
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
    """Mean next-token NLL over all completion tokens of ``examples`` (token-weighted), in nats.

    Runs under :func:`rimguard.passes.probe_mode` (eval mode, no grad, RNG forked, mode restored).
    """
    from rimguard.passes import model_device, pad, probe_mode

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


# -- evaluator --------------------------------------------------------------------------------
@dataclass
class Evaluator:
    """Behavioural evaluation of a model on fixed prompt sets.

    Args:
        tokenizer: the model's tokenizer.
        harmful: held-out harmful prompts (refusal rate: higher is safer).
        xstest: safe XSTest prompts (over-refusal: lower is better).
        gsm8k: conversational prompt/completion records for the held-out loss.
        max_new_tokens: greedy completion length for judging.
        max_length: truncation of the held-out loss examples (use the training ``max_length``).
        batch_size: generation and loss batch size.
        xstest_subset: if set, the number of XSTest prompts used at intermediate points; the
            full set is used where ``full_xstest=True`` is passed to :meth:`__call__`.
        keep_texts: completions kept per set in the record (for the report's samples).
    """

    tokenizer: Any
    harmful: Sequence[str]
    xstest: Sequence[str]
    gsm8k: Sequence[dict[str, Any]]
    max_new_tokens: int = 32
    max_length: int = 256
    batch_size: int = 8
    xstest_subset: int | None = None
    keep_texts: int = 0
    _examples: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._examples = completion_examples(self.tokenizer, self.gsm8k, self.max_length)

    def __call__(self, model: torch.nn.Module, full_xstest: bool = True) -> dict[str, Any]:
        from rimguard.demo.judge import refusal_rate
        from rimguard.passes import generate, pad_id

        start = time.perf_counter()
        out: dict[str, Any] = {}
        texts = generate(model, self.tokenizer, list(self.harmful), self.max_new_tokens, self.batch_size) if self.harmful else []
        judged = refusal_rate(texts)
        out.update({"refusal_rate": judged["refusal_rate"], "harmful_garbage_rate": judged["garbage_rate"], "n_harmful": judged["n"]})
        xs = list(self.xstest)
        if not full_xstest and self.xstest_subset is not None:
            xs = xs[: self.xstest_subset]
        x_texts = generate(model, self.tokenizer, xs, self.max_new_tokens, self.batch_size) if xs else []
        x_judged = refusal_rate(x_texts)
        out.update({"over_refusal": x_judged["refusal_rate"] if xs else math.nan, "xstest_garbage_rate": x_judged["garbage_rate"],
                    "n_xstest": x_judged["n"]})
        # the intermediate-point subset's rate, also at full points, so the series compare like with like
        sub = x_texts[: self.xstest_subset] if self.xstest_subset else x_texts
        out["over_refusal_subset"] = refusal_rate(sub)["refusal_rate"] if sub else math.nan
        out["gsm8k_loss"] = heldout_loss(model, self._examples, pad_id(self.tokenizer), self.batch_size) if self._examples else math.nan
        if self.keep_texts:
            out["samples"] = {"harmful": [{"prompt": p, "completion": t} for p, t in zip(self.harmful, texts)][: self.keep_texts],
                              "xstest": [{"prompt": p, "completion": t} for p, t in zip(xs, x_texts)][: self.keep_texts]}
        out["eval_seconds"] = time.perf_counter() - start
        return out


# -- callbacks --------------------------------------------------------------------------------
class EvalPoints(TrainerCallback):
    """Calls ``fn(step, model)`` at the given optimizer steps and stores the returned records.

    Step 0 is evaluated at train begin (before any update) unless ``skip_zero``; later steps at
    the end of that optimizer step. The model is put in eval mode under ``no_grad`` for the call
    and its previous mode restored. ``seconds[step]`` holds each call's wall time.
    """

    def __init__(self, steps: Sequence[int], fn: Callable[[int, torch.nn.Module], dict[str, Any]], skip_zero: bool = False,
                 on_train_begin_fn: Callable[[torch.nn.Module], None] | None = None) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.fn = fn
        self.skip_zero = skip_zero
        self.begin_fn = on_train_begin_fn
        self.records: list[dict[str, Any]] = []
        self.seconds: dict[int, float] = {}

    def _run(self, step: int, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                record = self.fn(step, model)
        finally:
            model.train(was_training)
        self.records.append({"step": step, **(record or {})})
        self.seconds[step] = time.perf_counter() - start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.begin_fn is not None:
            self.begin_fn(model)
        if 0 in self.steps and not self.skip_zero and state.global_step == 0:
            self._run(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step in self.steps and step > 0 and all(r["step"] != step for r in self.records):
            self._run(step, model)


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, end to end: from the previous step's end (the first step: its
    ``on_step_begin``) to this callback's ``on_step_end``. Everything a training step costs is in:
    data loading, every callback's ``on_step_begin`` (the safety anchor's forward runs there), the
    step itself and the callbacks before this one at ``on_step_end`` (the guard's checks).

    Place it after the guard and before :class:`EvalPoints` in the callback list: the guard's own
    work at that step is then counted and evaluation is not. ``times`` maps step -> seconds.
    """

    def __init__(self) -> None:
        self.times: dict[int, float] = {}
        self._last: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._last is None:
            self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.times[state.global_step] = now - self._last
        self._last = now


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return math.nan
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def step_time_summary(times: dict[int, float], check_steps: Sequence[int] = (), skip_first: int = 1) -> dict[str, float]:
    """Mean step time (all steps after the first ``skip_first``), median over steps without a
    probe check, and the time spent in check steps beyond that median."""
    items = sorted((s, t) for s, t in times.items() if s > skip_first)
    checks = set(check_steps)
    plain = [t for s, t in items if s not in checks]
    checked = [t for s, t in items if s in checks]
    base = median(plain)
    return {
        "steps_timed": len(items),
        "mean_s": sum(t for _, t in items) / len(items) if items else math.nan,
        "median_plain_s": base,
        "check_extra_s": sum(t - base for t in checked) if checked and base == base else 0.0,
        "n_check_steps": len(checked),
    }
