"""JSONL event log (metrics, level changes, freezes, faults); written by the main process only.

Every record carries the ``run_id`` of the guarded run that wrote it, so several runs into one
``output_dir`` stay apart. A resumed run keeps its run id and first drops its own records after
the checkpoint's step (an atomic rewrite), so each step appears once. A half-written last line (a
killed process) is skipped with a warning when the log is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger("rimguard")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventLog:
    """One JSON object per line, each with ``time`` (unix seconds) and ``run_id``. ``path=None`` writes nothing."""

    def __init__(self, path: str | Path | None, run_id: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.run_id = run_id
        self._file: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(_clean({"time": round(time.time(), 3), "run_id": self.run_id, **record})) + "\n")
        self._file.flush()

    # -- the guard's announcements: a record, and the matching warning on the main process ------------
    def level(self, step: int, previous: str, level: str, crossings: list[Any]) -> None:
        self.write({"event": "level", "step": step, "from": previous, "to": level, "crossings": [c.__dict__ for c in crossings]})
        warn_main("rimguard: risk level %s -> %s at step %d", previous, level, step)

    def fault(self, step: int, metrics: list[str], layers: list[int], level: str, new: bool) -> None:
        """A ``fault`` record at every check with non-finite metrics; a warning when a fault episode begins."""
        self.write({"event": "fault", "step": step, "metrics": metrics, "layers": layers, "level": level})
        if new:
            warn_main("rimguard: non-finite %s at step %d (activations of layer(s) %s); read as a fault, the level is held at "
                  "'%s' or above", ", ".join(metrics), step, layers or "-", level)

    def drop_after(self, step: int) -> int:
        """Remove this run's records with a step after ``step`` (a resume); atomic. Returns how many."""
        if self.path is None or not self.path.is_file():
            return 0
        self.close()
        kept, dropped = [], 0
        for record in read_events(self.path):
            if record.get("run_id") == self.run_id and record.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(record)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return dropped

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def warn_main(message: str, *args: Any) -> None:
    from rimguard import dist

    if dist.is_main():
        logger.warning(message, *args)


def read_text(path: str | Path, error: type[Exception] = ValueError) -> str:
    """A UTF-8 text file's contents (a leading BOM dropped); bytes that are not UTF-8 raise ``error``
    naming the file and the offset."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
                    "save it as UTF-8") from None


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> list[Any]:
    """Parse a JSONL file, skipping blank lines; raises ``error`` naming the file and line on bad input."""
    path = Path(path)
    return read_jsonl_lines(path, read_text(path, error).splitlines(), error)


def read_jsonl_lines(path: Path, lines: list[str], error: type[Exception] = ValueError) -> list[Any]:
    records = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise error(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    return records


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse a guard JSONL log. A half-written last line (no newline: the writer was killed) is
    skipped with a warning; any other bad line raises ValueError naming the file and line."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    tail = lines.pop() if lines and not text.endswith("\n") else ""
    records = read_jsonl_lines(path, lines)
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            logger.warning("rimguard: %s ends with a half-written line (%d characters); skipped", path, len(tail))
    return records


def runs_of(events: list[dict[str, Any]]) -> list[str]:
    """The run ids in a log, in the order they first appear (``""`` for records written before run ids)."""
    return list(dict.fromkeys(e.get("run_id", "") for e in events))
