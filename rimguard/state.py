"""The guard's checkpoint state: what a checkpoint holds of the guard, and how it is written and read back.

A :class:`GuardState` is the run's id, its atlas, its metric history and one :class:`Saved` per
part (``policy``, ``monitor``, ``freezer``, ``regularizer``, ``heads``): tensors, and plain data.
On disk (``checkpoint-N/rimguard/``): ``atlas/``, ``state.safetensors`` (every part's tensors, as
``part.name``) and ``state.json`` (the rest, with the tensors' SHA-256). Reading checks every field
the guard relies on; any defect is one :class:`GuardStateError` naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes

from rimguard.atlas import AtlasError, NeuronAtlas
from rimguard.files import atomic_folder
from rimguard.policy import LEVELS
from rimguard.saved import Saved
from rimguard.schema import Reader

logger = logging.getLogger("rimguard")

STATE_DIR = "rimguard"  # inside a checkpoint folder
ATLAS_DIR = "rimguard_atlas"  # inside output_dir
FORMAT = 3  # 3 added the measurement settings and the owner token (format 2 still reads, unchecked)
READABLE = (2, 3)
# the settings the saved references were measured with: a resume under other values would compare unlike things
MEASURED = ("max_length", "check_probes", "margin_probes", "kl_probes", "kl_top_k", "kl_max_length", "witness_tokens", "refusal_kl",
            "head_probes", "rel_floor")


class GuardStateError(RuntimeError):
    """The guard's checkpoint state is missing or unusable; the message names the path and the remedies."""


@dataclass
class GuardState:
    """Everything needed to resume a guarded run.

    Attributes:
        run_id: the guarded run's id (every log record carries it).
        atlas: the run's neuron atlas.
        history: the metric records logged so far.
        parts: per part name, its :class:`Saved` state.
        measured: the config's :data:`MEASURED` settings at save (None: a format-2 state).
        owner: a token of the training state it was saved with (the HF callback: a digest of the Trainer's log
            history, which the checkpoint's ``trainer_state.json`` holds too); None: not known.
        step: the optimizer step of the checkpoint (set when it is read for a resume).
    """

    run_id: str
    atlas: NeuronAtlas
    history: list[dict[str, Any]]
    parts: dict[str, Saved]
    measured: dict[str, Any] | None = None
    owner: str | None = None
    step: int = 0

    def part(self, name: str) -> Saved | None:
        return self.parts.get(name)

    def save(self, folder: str | Path) -> None:
        """Write into ``folder``, built under a temporary name and renamed into place when complete: a kill
        mid-save leaves the previous state or none, never a partial one."""
        tensors = {f"{name}.{key}": t.detach().cpu().contiguous() for name, saved in self.parts.items() for key, t in saved.tensors.items()}
        data = safetensors_bytes(tensors)
        meta = {"format": FORMAT, "tensors_sha256": hashlib.sha256(data).hexdigest(), "run_id": self.run_id,
                "history": self.history, "parts": {name: saved.meta for name, saved in self.parts.items()},
                "measured": self.measured, "owner": self.owner}
        with atomic_folder(folder) as tmp:
            self.atlas.save(tmp / "atlas")
            (tmp / "state.safetensors").write_bytes(data)
            (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> "GuardState":
        """Read a guard state folder, checking every field; any defect is a :class:`GuardStateError` (or the
        atlas' :class:`AtlasError`) naming the file and the field."""
        r, name = Reader(folder, GuardStateError), "state.json"
        meta = r.json(name)
        if meta.get("format") not in READABLE:
            r.fail(r.folder / name, f"guard state format {meta.get('format')!r} (this rimguard reads {READABLE})")
        tensors = r.tensors("state.safetensors", meta.get("tensors_sha256"))
        atlas = NeuronAtlas.load(r.folder / "atlas")
        metas = r.field(meta, "parts", dict, name)
        parts: dict[str, Saved] = {}
        for part, data in metas.items():
            if not isinstance(data, dict):
                r.fail(r.folder / name, f"field 'parts.{part}' must be an object")
            prefix = part + "."
            parts[part] = Saved({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, data)
        _check_parts(r, name, parts, atlas)
        history = r.field(meta, "history", list, name)
        if not all(isinstance(h, dict) and isinstance(h.get("step"), int) for h in history):
            r.fail(r.folder / name, "field 'history' must be a list of records with an integer 'step'")
        measured = r.field(meta, "measured", dict, name, optional=True)
        owner = r.field(meta, "owner", str, name, optional=True)
        return cls(r.field(meta, "run_id", str, name, optional=True) or "", atlas, history, parts, measured, owner)

    def check_resume(self, measured: dict[str, Any], owner: str | None, where: str | Path) -> None:
        """Refuse a resume this state does not belong to: other measurement settings (the references would
        not match what is measured now), or another training state than the one it was saved with (the Trainer
        resumed from another checkpoint than the one this state came from, or the state was copied)."""
        if self.measured is not None:
            changed = {k: (self.measured.get(k), measured[k]) for k in measured if self.measured.get(k) != measured[k]}
            if changed:
                said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise GuardStateError(f"{where}: this run's references were measured with other settings ({said}); resume with "
                                      "the settings it was saved with, or start a new run")
        if self.owner is not None and owner is not None and self.owner != owner:
            raise GuardStateError(f"{where}: this guard state was saved by another training run than the one the Trainer resumed "
                                  "(another run's checkpoint, or a guard state copied from elsewhere); resume from the checkpoint "
                                  "this state belongs to")


def measured_settings(config: Any) -> dict[str, Any]:
    """The :data:`MEASURED` fields of a ``GuardConfig``."""
    return {k: getattr(config.atlas if k == "max_length" else config.monitor, k) for k in MEASURED}


def _check_parts(r: Reader, name: str, parts: dict[str, Saved], atlas: NeuronAtlas) -> None:
    """The fields of each part that the guard reads back."""
    where = r.folder / name
    policy = parts.get("policy")
    if policy is None:
        r.fail(where, "field 'parts.policy' is missing")
    if policy.meta.get("level") not in LEVELS or not isinstance(policy.meta.get("streak"), int):
        r.fail(where, f"field 'parts.policy' must hold a level in {LEVELS} and an integer streak, found {policy.meta}")
    r.field(policy.meta, "checkpointed", bool, name)
    tie = parts.get("tie")
    if tie is None:
        r.fail(where, "field 'parts.tie' is missing")
    weight = r.field(tie.meta, "reg_lambda", (int, float), name)
    if weight < 0:
        r.fail(where, f"field 'reg_lambda' must be >= 0, found {weight}")
    freezer = parts.get("freezer")
    if freezer is not None:
        frozen, sizes = freezer.meta.get("frozen"), atlas.layer_sizes
        if not (isinstance(frozen, list) and len(frozen) == len(sizes) and all(
                isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in ids)
                for ids, n in zip(frozen, sizes))):
            r.fail(where, f"field 'frozen' must hold one list of neuron ids per layer ({len(sizes)} layers) within the "
                          "layer sizes of the atlas")
    monitor = parts.get("monitor")
    tracked = atlas.tracked.shape[0]
    for key in ("ref_safe", "ref_task", "ema_task"):
        t = monitor.tensors.get(key) if monitor is not None else None
        if t is not None and t.numel() != tracked:
            r.fail(r.folder / "state.safetensors", f"tensor 'monitor.{key}' has {t.numel()} entries for the atlas' {tracked} "
                                                   "tracked neurons (a state of another atlas)")
    heads = parts.get("heads")
    if heads is not None and heads.tensors:
        ref = r.tensor(heads.tensors, "ref_mass", "state.safetensors", True, (None,))
        r.values(ref, "heads.ref_mass", "state.safetensors", 0.0, 1.0)
        if ref.numel() > atlas.num_heads:
            r.fail(r.folder / "state.safetensors", f"tensor 'heads.ref_mass' has {ref.numel()} entries for the atlas' "
                                                   f"{atlas.num_heads} refusal heads")


def find_state(checkpoint: str | Path) -> Path | None:
    """The guard state folder inside a Trainer checkpoint folder, or None if the checkpoint has none."""
    return find_state_folder(Path(checkpoint) / STATE_DIR)


def find_state_folder(folder: Path) -> Path | None:
    return folder if (folder / "state.json").is_file() else None


def save_atlas(output_dir: Path, atlas: NeuronAtlas) -> Path:
    """Save to ``output_dir/rimguard_atlas``; an existing, different atlas there is never overwritten
    (the new one goes to ``rimguard_atlas-2``, ``-3``, ...). Returns the folder.

    The atlas is written to a temporary folder first and claimed by renaming it into place: two runs
    saving into one folder at once each get their own name (a rename onto an existing atlas fails)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".{ATLAS_DIR}.", suffix=".tmp"))
    try:
        atlas.save(tmp)
        n = 1
        while True:
            folder = output_dir / (ATLAS_DIR if n == 1 else f"{ATLAS_DIR}-{n}")
            if not folder.exists():
                try:
                    os.rename(tmp, folder)
                    break
                except OSError:  # another run claimed this name between the check and the rename
                    continue
            try:
                if NeuronAtlas.load(folder).same_selection(atlas):
                    return folder
            except AtlasError:
                pass
            n += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if n > 1:
        logger.warning("rimguard: %s holds a different atlas; this run's atlas is saved to %s", output_dir / ATLAS_DIR, folder)
    return folder


PENDING_DIR = "rimguard_pending"  # inside output_dir: guard states written before the Trainer's save of that step


def pending_state(output_dir: str | Path, step: int) -> Path:
    """Where the guard state of the checkpoint the Trainer is about to save at ``step`` is written first: the
    Trainer rotates older checkpoints out before its save callbacks run, so a state written only then could be
    the only one, half-written, when a kill comes."""
    return Path(output_dir) / PENDING_DIR / f"checkpoint-{step}"


def adopt_pending(output_dir: str | Path, step: int, target: str | Path) -> bool:
    """Move the pending state of ``step`` into the checkpoint (one rename); False if there is none."""
    pending = pending_state(output_dir, step)
    if not (pending / "state.json").is_file():
        return False
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(pending, target)
    for older in (Path(output_dir) / PENDING_DIR).glob("checkpoint-*"):  # states of saves that never happened
        if int(older.name.split("-")[-1]) < step:
            shutil.rmtree(older, ignore_errors=True)
    return True


def resume_state(checkpoint: str | Path, step: int, on_missing: str, output_dir: str | Path) -> tuple[GuardState | None, NeuronAtlas | None]:
    """The guard state saved in the Trainer checkpoint ``checkpoint`` (of optimizer step ``step``), for a resume.

    A checkpoint without guard state follows ``on_missing`` (``MonitorConfig.on_missing_state``), never a silent
    re-identification: ``"error"`` raises, naming the remedies; ``"atlas"`` returns ``output_dir``'s saved atlas
    (references are then re-taken now); ``"fresh"`` returns neither (identify anew). Returns ``(state, atlas)``.
    """
    folder = find_state(checkpoint) or find_state_folder(pending_state(output_dir, step))  # killed before it moved in
    if folder is not None:
        state = GuardState.read(folder)
        state.step = step
        return state, None
    saved = Path(output_dir) / ATLAS_DIR
    where = Path(checkpoint) / STATE_DIR
    if on_missing == "error":
        raise GuardStateError(
            f"resuming at step {step}, but {where} holds no guard state. Either resume from a checkpoint saved with "
            f"the guard attached, or set GuardConfig(on_missing_state='atlas') to reuse the saved atlas {saved} with "
            "references re-taken now (the metrics then measure drift since this resume), or on_missing_state='fresh' "
            "to identify anew on the current weights")
    logger.warning("rimguard: resuming at step %d without guard state (%s); on_missing_state=%r: %s", step, where, on_missing,
                   f"reusing {saved}, references re-taken now" if on_missing == "atlas" else "identifying anew")
    return None, NeuronAtlas.load(saved) if on_missing == "atlas" else None
