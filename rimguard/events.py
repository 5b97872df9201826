"""JSONL event log (metrics, level changes, freezes, faults); written by the main process only.

Every record carries the ``run_id`` of the guarded run that wrote it, so several runs into one
``output_dir`` stay apart. The log is append-only: a resumed run keeps its run id and appends a
``resume`` record at the checkpoint's step; its earlier records after that step are *superseded*
(kept in the file, left out by :func:`live_events`, which is what the report reads), so each step
appears once in the live view. A half-written last line (a killed process) is skipped with a warning
when the log is read; the next writer starts on a new line after it and says so in a ``torn`` record.
The log is never written through a symlink.
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
            self._file = self._open()
        self._file.write(json.dumps(_clean({"time": round(time.time(), 3), "run_id": self.run_id, **record})) + "\n")
        self._file.flush()

    def _open(self) -> IO[str]:
        assert self.path is not None
        if self.path.is_symlink():
            raise OSError(f"{self.path} is a symlink; rimguard writes its log only as a plain file in the run folder "
                          "(remove the link or set log_file to another name)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a", encoding="utf-8")
        torn = _torn_tail(self.path)
        if torn:  # a killed writer's last line: start on a new one, and say so (the reader skips that line)
            handle.write("\n" + json.dumps({"time": round(time.time(), 3), "run_id": self.run_id, "event": "torn", "step": 0, "chars": torn}) + "\n")
        return handle

    @classmethod
    def of_run(cls, folder: str | Path, name: str | None, run_id: str, resumed_at: int | None = None) -> "EventLog":
        """The log ``folder/name`` of run ``run_id`` (``name`` None: no file). A resume at step ``resumed_at`` is marked
        with a ``resume`` record: this run's records after that step, written before now, are superseded (kept)."""
        log = cls(Path(folder) / name if name else None, run_id)
        if resumed_at is not None:
            log.write({"event": "resume", "step": resumed_at})
        return log

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


def _torn_tail(path: Path) -> int:
    """Characters after the last newline of a non-empty file (a half-written line), else 0."""
    with path.open("rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(max(0, size - 65536))
        tail = fh.read()
    return 0 if tail.endswith(b"\n") else len(tail) - (tail.rfind(b"\n") + 1)


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Parse a guard JSONL log. A half-written line (the writer was killed) is skipped with a warning: the
    last line without its newline, or a line followed by the next writer's ``torn`` record; any other bad
    line raises ValueError naming the file and line."""
    path = Path(path)
    text = read_text(path)
    lines = text.split("\n")
    tail = lines.pop() if lines and not text.endswith("\n") else ""
    for n, line in enumerate(lines[:-1]):
        if '"event": "torn"' in lines[n + 1] and not _parses(line):
            logger.warning("rimguard: %s line %d is a half-written record (%d characters); skipped", path, n + 1, len(line))
            lines[n] = ""
    records = read_jsonl_lines(path, lines)
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            logger.warning("rimguard: %s ends with a half-written line (%d characters); skipped", path, len(tail))
    return records


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def live_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records still in force: a ``resume`` record of a run at step ``s`` supersedes that run's earlier
    records with a step after ``s`` (an attempt that went on past the checkpoint it was resumed from).
    ``torn`` and ``resume`` markers themselves are left out."""
    superseded: set[int] = set()
    for i, e in enumerate(events):
        if e.get("event") == "resume":
            run, step = e.get("run_id", ""), e.get("step", 0)
            superseded.update(j for j in range(i) if events[j].get("run_id", "") == run and events[j].get("step", 0) > step)
    return [e for i, e in enumerate(events) if i not in superseded and e.get("event") not in ("resume", "torn")]


def runs_of(events: list[dict[str, Any]]) -> list[str]:
    """The run ids in a log, in the order they first appear (``""`` for records written before run ids)."""
    return list(dict.fromkeys(e.get("run_id", "") for e in events))
