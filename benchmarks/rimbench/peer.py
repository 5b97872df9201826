"""The peer monitor ``safety-compass`` (PyPI, benchmark environment only), measured on demand.

Built like ``benchmarks/overhead.py``'s ``peer_callback``: a "refusal" concept from contrastive
pairs of rimguard's bundled harmful vs harmless prompts (Arditi-style pairing), read at the middle
layer. The benchmark does not let it schedule itself: :class:`Peer` sets its baseline direction at
train start and measures at the benchmark's eval points, so both monitors are read at the same
steps. Its signal is the cosine of the current refusal direction to the baseline one (1.0 at
step 0; it falls as the direction drifts).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

from rimguard.probes import bundled

COSINE = "refusal_cosine_to_baseline"


def available() -> tuple[bool, str]:
    """``(True, version)`` if ``safety_compass`` imports, else ``(False, reason)``."""
    try:
        import safety_compass  # noqa: F401
        from safety_compass.monitor import SafetyCompassMonitor  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "skip the peer"
        return False, f"{type(err).__name__}: {err}"
    return True, getattr(safety_compass, "__version__", "unknown version")


def write_pairs(workdir: Path, pairs: int) -> Path:
    harmful, harmless = bundled("harmful")[:pairs], bundled("harmless")[:pairs]
    rows = [{"system": "You are a helpful assistant.", "positive_query": h, "negative_query": s,
             "split": "val" if i % 4 == 0 else "train"} for i, (h, s) in enumerate(zip(harmful, harmless))]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


class Peer:
    """safety-compass's monitor on one model: :meth:`start` takes the baseline, :meth:`measure`
    returns its row (``refusal_cosine_to_baseline``, AUROCs, direction norm)."""

    def __init__(self, tokenizer: Any, workdir: str | Path, pairs: int = 32, batch_size: int = 8, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.workdir = Path(workdir)
        self.pairs = pairs
        self.batch_size = batch_size
        self.max_length = max_length
        self.monitor = None

    def start(self, model: Any) -> None:
        from safety_compass.monitor import SafetyCompassMonitor

        write_pairs(self.workdir, self.pairs)
        cfg = model.config
        concept = {"name": "refusal", "pairing_strategy": "arditi", "contrastive_pairs_file": "pairs.jsonl",
                   "best_layer": max(1, cfg.num_hidden_layers // 2), "min_auroc": 0.0}
        model_cfg = {"model_name": "bench", "num_layers": cfg.num_hidden_layers, "hidden_dim": cfg.hidden_size,
                     "extraction_batch_size": self.batch_size, "extraction_dtype": "float32", "max_seq_length": self.max_length}
        # the extractor sets the tokenizer's padding side while it runs; give it its own copy
        import copy

        tok = copy.deepcopy(self.tokenizer)
        self.monitor = SafetyCompassMonitor(model, tok, [concept], model_cfg, base_dir=str(self.workdir))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per extraction
            self.monitor.setup()

    def measure(self, model: Any, step: int) -> dict[str, float]:
        import torch

        assert self.monitor is not None, "call start() first"
        self.monitor.set_model(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                row = self.monitor.measure(step=step)
        finally:
            model.train(was_training)
        return {k: float(v) for k, v in row.items() if k.startswith("refusal_")}
