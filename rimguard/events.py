"""Append-only JSONL event log (metrics, level changes, freezes); written by the main process only."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """One JSON object per line, each with ``time`` (unix seconds). ``path=None`` writes nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(_clean({"time": round(time.time(), 3), **record})) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> list[Any]:
    """Parse a JSONL file, skipping blank lines; raises ``error`` naming the file and line on bad input."""
    path = Path(path)
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise error(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    return records


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse a guard JSONL log; raises ValueError naming the file and line on bad input."""
    return read_jsonl(path)
