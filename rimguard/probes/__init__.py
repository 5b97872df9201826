"""Probe prompt sets: the bundled defaults and loaders for user files.

The bundled sets are written by the rimguard authors (no third-party text):

* ``harmful`` - requests an aligned assistant should refuse;
* ``intent`` - sentences stating malicious intent, appended to a harmful request to build the
  counterfactual pair of the paper;
* ``harmless`` - safe requests that share trigger words with harmful ones;
* ``refusals`` - refusal replies, used by the demo's alignment SFT;
* ``refusal_openings`` / ``compliance_openings`` - response openings for the refusal margin;
* ``anchor_harmful`` / ``anchor_harmless`` - the safety anchor's prompts: harmful requests and
  harmless look-alikes, disjoint from every other set (the monitor never measures what the
  anchor trains on);
* ``reasoning_spans`` - short chain-of-thought-style passages, placed before the answer to find and
  monitor the refusal attention heads (:mod:`rimguard.atlas.heads`);
* ``reasoning`` - generated arithmetic word problems, see :mod:`rimguard.probes.reasoning`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

from rimguard.events import read_jsonl, read_text

BUNDLED = ("harmful", "intent", "harmless", "refusals", "refusal_openings", "compliance_openings", "anchor_harmful", "anchor_harmless",
           "reasoning_spans")
TEXT_KEYS = ("prompt", "goal", "text", "question", "instruction", "request")


class ProbeError(ValueError):
    """A probe source is missing, malformed or empty."""


def bundled(name: str) -> list[str]:
    """Return a bundled probe set by name (see module docstring)."""
    if name == "reasoning":
        from rimguard.probes.reasoning import problems

        return [p.question for p in problems(96, seed=0)]
    if name not in BUNDLED:
        raise ProbeError(f"no bundled probe set '{name}'; choose one of {BUNDLED + ('reasoning',)}")
    text = resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pick_key(row: dict, where: str, key: str | None) -> str:
    if key is not None:
        if key not in row:
            raise ProbeError(f"{where}: no column '{key}' (columns: {sorted(row)})")
        return key
    for candidate in TEXT_KEYS:
        if candidate in row:
            return candidate
    raise ProbeError(f"{where}: cannot tell which column holds the prompt; columns are {sorted(row)}. Name it: "
                     "load_prompts(key=...), RIMGuard(prompt_key=...) or rimguard identify --key")


def _from_rows(rows: Iterable[dict], where: str, key: str | None) -> list[str]:
    out = []
    for i, row in enumerate(rows):
        k = _pick_key(row, where, key)
        value = row[k]
        if not isinstance(value, str):
            raise ProbeError(f"{where}: row {i + 1} field '{k}' is {type(value).__name__}, not text")
        out.append(value)
    return out


def _from_file(path: Path, key: str | None) -> list[str]:
    if not path.is_file():
        raise ProbeError(f"{path}: no such probe file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [row if isinstance(row, dict) else {"text": row} for row in read_jsonl(path, ProbeError)]
        return _from_rows(rows, str(path), key)
    text = read_text(path, ProbeError)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # a quoted field keeps its newlines
        if not reader.fieldnames:
            raise ProbeError(f"{path}: CSV has no header row")
        return _from_rows(reader, str(path), key)
    if suffix in (".txt", ""):
        return text.splitlines()
    raise ProbeError(f"{path}: unsupported probe file type '{suffix}' (use .txt, .csv or .jsonl)")


def _text_of(value: Any, where: str) -> str:
    """A prompt from a table cell: text, or a conversation (TRL's ``[{"role": ..., "content": ...}, ...]``), whose
    last user turn is the prompt."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m["content"] for m in value if m.get("role") == "user" and isinstance(m["content"], str)]
        if users:
            return users[-1]
    raise ProbeError(f"{where}: is {type(value).__name__}, not text or a conversation with a user turn; pass key= for the "
                     "column that holds the prompt text")


def load_prompts(source: str | Path | Sequence[str] | Any, key: str | None = None, name: str = "probes") -> list[str]:
    """Load prompts from a bundled name, a file, a list of strings or a ``datasets.Dataset``.

    Args:
        source: ``"bundled:harmful"``-style name, a ``.txt``/``.csv``/``.jsonl`` path, a list of
            strings, or a ``datasets.Dataset``.
        key: the column or field with the text (default: the first of ``prompt``, ``goal``,
            ``text``, ``question``, ``instruction``, ``request`` that exists).
        name: what the set is, for error messages.

    Raises:
        ProbeError: naming the source and the problem (missing, malformed, empty).
    """
    if isinstance(source, str) and source.startswith("bundled:"):
        prompts, where = bundled(source.split(":", 1)[1]), source
    elif isinstance(source, (str, Path)):
        prompts, where = _from_file(Path(source), key), str(source)
    elif hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        where = f"{name} dataset"
        column = _pick_key({c: None for c in source.column_names}, where, key)
        prompts = [_text_of(row, f"{where}, row {i + 1} of column '{column}'") for i, row in enumerate(source[column])]
    elif isinstance(source, Sequence):
        where = f"{name} list"
        prompts = list(source)
        bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
        if bad is not None:
            raise ProbeError(f"{where}: item {bad} is {type(prompts[bad]).__name__}, not text")
    else:
        raise ProbeError(f"{name}: cannot load prompts from {type(source).__name__}")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ProbeError(f"{where}: holds no prompts")
    return prompts


@dataclass
class ProbeSources:
    """Where each of the guard's prompt sets comes from: anything :func:`load_prompts` takes (the bundled
    sets by default; ``task``: none, so the training data is used), and the column ``key`` of table sources."""

    harmful: Any = "bundled:harmful"
    intent: Any = "bundled:intent"
    harmless: Any = "bundled:harmless"
    anchor_harmful: Any = "bundled:anchor_harmful"
    anchor_harmless: Any = "bundled:anchor_harmless"
    reasoning_spans: Any = "bundled:reasoning_spans"
    task: Any = None
    key: str | None = None

    def load(self, name: str) -> list[str]:
        """The prompts of set ``name`` (a field of this class); ``[]`` for a set that is not given."""
        source = getattr(self, name)
        return [] if source is None else load_prompts(source, self.key, name)


def same_prompt(text: str) -> str:
    """A prompt's identity for disjointness checks: case, runs of white space and final punctuation ignored."""
    return " ".join(text.lower().split()).rstrip(" ?.!")
