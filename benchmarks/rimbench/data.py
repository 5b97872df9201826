"""Loaders for the benchmark's data sets, each checked and turned into plain Python lists.

* GSM8K (``train.jsonl``: one JSON object a line with ``question`` and ``answer``; the answer is
  the step-by-step solution ending in ``#### <number>``, with calculator annotations ``<<a*b=c>>``).
* AdvBench harmful behaviours (``harmful_behaviors.csv``, the request in column ``goal``).
* XSTest prompts (``xstest_prompts.csv``: ``id, prompt, type, label, focus, note``; ``label`` is
  ``safe`` or ``unsafe``; the ``contrast_*`` types are the unsafe twins).

Everything is deterministic for a seed.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path
from typing import Any, Sequence

from rimguard.events import read_jsonl

CALC = re.compile(r"<<[^<>]*>>")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""


def _need_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def _csv_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, str]]:
    path = _need_file(path)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (columns: {columns})")
        return [dict(row) for row in reader]


# -- GSM8K ------------------------------------------------------------------------------------
def clean_solution(answer: str, strip_calculator: bool = True) -> str:
    """The GSM8K solution text, without the ``<<...>>`` calculator annotations if asked."""
    text = CALC.sub("", answer) if strip_calculator else answer
    return text.strip()


def load_gsm8k(path: str | Path, strip_calculator: bool = True) -> list[dict[str, str]]:
    """``[{"question", "answer"}]`` from a GSM8K-style JSONL file (blank lines skipped)."""
    path = _need_file(path)
    rows = []
    for n, row in enumerate(read_jsonl(path, DataError), 1):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DataError(f"{path}: record {n} needs string fields 'question' and 'answer'")
        rows.append({"question": row["question"].strip(), "answer": clean_solution(row["answer"], strip_calculator)})
    if not rows:
        raise DataError(f"{path}: no examples")
    return rows


def split_gsm8k(rows: Sequence[dict[str, str]], heldout: int, train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train_rows, heldout_rows)``: the held-out set is the last ``heldout`` rows of the file
    (fixed, the same for every seed); the training rows are ``train`` rows drawn without
    replacement from the rest in a seed-dependent order."""
    if heldout < 0 or train < 0:
        raise ValueError("heldout and train must be >= 0")
    if heldout + train > len(rows):
        raise DataError(f"GSM8K has {len(rows)} rows; {train} train + {heldout} held-out requested")
    held = list(rows[len(rows) - heldout:]) if heldout else []
    pool = list(rows[: len(rows) - heldout])
    random.Random(seed).shuffle(pool)
    return pool[:train], held


def conversational(rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """TRL's conversational prompt/completion records."""
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows]


# -- AdvBench and XSTest ----------------------------------------------------------------------
def load_advbench(path: str | Path, column: str = "goal") -> list[str]:
    """The harmful requests of an AdvBench-style CSV (column ``goal``), in file order."""
    rows = _csv_rows(path, [column])
    prompts = [r[column].strip() for r in rows if (r[column] or "").strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts in column '{column}'")
    return prompts


def load_xstest(path: str | Path, label: str = "safe") -> list[dict[str, str]]:
    """XSTest rows with ``label`` (``safe``: the prompts a well-calibrated model answers), each
    ``{"id", "prompt", "type"}``, in file order."""
    rows = _csv_rows(path, ["prompt", "type", "label"])
    out = [{"id": r.get("id", str(i)), "prompt": r["prompt"].strip(), "type": r["type"].strip()}
           for i, r in enumerate(rows) if (r["label"] or "").strip().lower() == label and (r["prompt"] or "").strip()]
    if not out:
        raise DataError(f"{path}: no rows with label '{label}'")
    return out


def sample(items: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """A fixed subset of ``n`` items (all if ``n`` is None or >= len), in their original order."""
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError("n must be >= 0")
    chosen = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in chosen]


def stratified(rows: Sequence[dict[str, str]], n: int | None, key: str = "type", seed: int = 0) -> list[dict[str, str]]:
    """``n`` rows spread evenly over the values of ``key`` (round-robin), in file order."""
    if n is None or n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r[key], []).append(i)
    for idx in groups.values():
        rng.shuffle(idx)
    chosen: list[int] = []
    names = sorted(groups)
    while len(chosen) < n:
        for name in names:
            if groups[name] and len(chosen) < n:
                chosen.append(groups[name].pop())
    return [rows[i] for i in sorted(chosen)]
