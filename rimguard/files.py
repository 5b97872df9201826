"""How rimguard writes files: whole or not at all, and never through a link.

* :func:`write_atomic` - a file's new contents go to a temporary file in the same folder, then
  replace it (``os.replace``): a reader sees the old file or the new one, never half of one, and a
  symlink at the path is replaced by the file, its target left untouched;
* :func:`atomic_folder` - a folder is built under a temporary name and renamed into place when
  complete, so a kill mid-write leaves no folder that looks whole;
* :func:`plain_name` - a file name given in a config must name a file in the run folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` to fill; on success it replaces ``path`` (an older folder
    there is removed only after the new one is complete). On an error the temporary folder is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        if path.is_symlink() or path.is_file():
            path.unlink()
        old = None
        if path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plain_name(name: str) -> bool:
    """Whether ``name`` is a bare file name (no folder part, not ``.``/``..``, not absolute)."""
    return bool(name) and name not in (".", "..") and Path(name).name == name and "/" not in name and "\\" not in name
