"""Checked reading of the files rimguard writes and reads back (the atlas, the guard's checkpoint state).

Every failure raises the caller's error class (``AtlasError``, ``GuardStateError``) with a message
that names the file and the field: a truncated or garbled file, a wrong type, a wrong length, an
index out of range, or tensor bytes that no longer match the checksum written beside them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Reader:
    """Reads and checks one saved folder; ``error`` is the exception class raised on any defect."""

    def __init__(self, folder: str | Path, error: type[Exception]) -> None:
        self.folder = Path(folder)
        self.error = error

    def fail(self, where: str | Path, what: str) -> None:
        raise self.error(f"{where}: {what}")

    def json(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.fail(path, "missing")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self.fail(path, f"not valid UTF-8 JSON ({str(err)[:160]}); the file is truncated or corrupt")
        except (RecursionError, ValueError) as err:  # nesting too deep; an integer past Python's digit limit
            self.fail(path, f"not a rimguard file ({type(err).__name__}: {str(err)[:120]})")
        if not isinstance(meta, dict):
            self.fail(path, f"expected a JSON object, found {type(meta).__name__}")
        return meta

    def tensors(self, name: str, sha256: Any = None) -> dict[str, torch.Tensor]:
        """Load a safetensors file; when ``sha256`` (written beside it) is given, the bytes must match it."""
        path = self.folder / name
        if not path.is_file():
            self.fail(path, "missing")
        if sha256 is not None and file_sha256(path) != sha256:
            self.fail(path, "checksum mismatch: the tensor file changed after it was saved (corrupt or edited)")
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) on bad bytes
            self.fail(path, f"unreadable tensor file ({err})")
        raise AssertionError  # unreachable: fail() raises

    # -- fields of a JSON object ---------------------------------------------------------------
    def field(self, meta: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str, optional: bool = False) -> Any:
        if key not in meta:
            if optional:
                return None
            self.fail(self.folder / name, f"field '{key}' is missing")
        value = meta[key]
        if optional and value is None:
            return None
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            self.fail(self.folder / name, f"field '{key}' must be {_kind_name(kind)}, found a boolean")
        if not isinstance(value, kind):
            self.fail(self.folder / name, f"field '{key}' must be {_kind_name(kind)}, found {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            self.fail(self.folder / name, f"field '{key}' must be finite, found {value}")
        return value

    def strings(self, meta: dict[str, Any], key: str, name: str, nonempty: bool = True, optional: bool = False) -> list[str] | None:
        value = self.field(meta, key, list, name, optional=optional)
        if value is None:
            return None
        if not all(isinstance(v, str) for v in value):
            self.fail(self.folder / name, f"field '{key}' must be a list of strings")
        if nonempty and not value:
            self.fail(self.folder / name, f"field '{key}' is empty")
        return value

    # -- tensors -------------------------------------------------------------------------------
    def tensor(self, tensors: dict[str, torch.Tensor], key: str, name: str, floating: bool, shape: tuple[int | None, ...],
               optional: bool = False) -> torch.Tensor | None:
        """``tensors[key]`` with the given kind and shape (``None`` in ``shape``: any size)."""
        where = self.folder / name
        if key not in tensors:
            if optional:
                return None
            self.fail(where, f"tensor '{key}' is missing")
        t = tensors[key]
        if t.is_floating_point() != floating:
            self.fail(where, f"tensor '{key}' must be {'floating point' if floating else 'integer'}, found {t.dtype}")
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            self.fail(where, f"tensor '{key}' must have shape {want}, found {list(t.shape)}")
        return t

    def indices(self, t: torch.Tensor, key: str, name: str, upper: int | torch.Tensor) -> None:
        """Every entry of ``t`` in ``[0, upper)`` (``upper`` broadcasts against ``t``)."""
        bad = (t < 0) | (t >= upper)
        if t.numel() and bool(bad.any()):
            first = int(t[bad].reshape(-1)[0])
            self.fail(self.folder / name, f"tensor '{key}' holds index {first}, out of range")

    def values(self, t: torch.Tensor, key: str, name: str, low: float, high: float) -> None:
        """Every entry of ``t`` finite and in ``[low, high]``."""
        bad = ~torch.isfinite(t) | (t < low) | (t > high)
        if t.numel() and bool(bad.any()):
            self.fail(self.folder / name, f"tensor '{key}' holds {float(t[bad].reshape(-1)[0])}, outside [{low}, {high}]")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if set(kinds) == {int, float}:
        return "a number"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
