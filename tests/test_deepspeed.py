"""DeepSpeed ZeRO-2 and ZeRO-3 on two CPU ranks (gloo, DeepSpeed's CPU accelerator) through the HF Trainer and
``RIMGuard.attach``: the guard's numbers are those of one plain process on the same data
(tests/scripts/deepspeed_trainer_run.py), the safety anchor's gradient reaches DeepSpeed's step, frozen slices hold,
and a resume from DeepSpeed's checkpoint continues the same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_trainer_run.py"
CONFIGS = Path(__file__).resolve().parent.parent / "integrations"
# (ZeRO stage, guard mode, resumed from a checkpoint at step 4): ZeRO-3 partitions the parameters, so it runs every mode;
# ZeRO-2 keeps whole parameters on every rank, and runs the two actions
RUNS = [(3, "monitor", False), (3, "regularize", True), (3, "freeze", True), (2, "regularize", False), (2, "freeze", False)]
RTOL = 1e-3  # float noise of 10 AdamW steps, summed in another order over partitions
ATOL = 1e-5  # for values near 0 (a z-score of a difference of two near-equal means)


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> dict[str, dict]:
    """The one-process runs, per mode (no DeepSpeed)."""
    pytest.importorskip("deepspeed")
    out = {}
    for mode in ("monitor", "regularize", "freeze"):
        folder = tmp_path_factory.mktemp(f"one-{mode}")
        out[mode] = _run([sys.executable, str(SCRIPT), str(folder), mode, "none"], folder)[0]
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[tuple[int, str], list[dict]]:
    """The two-rank DeepSpeed runs, per (stage, mode): each rank's record."""
    pytest.importorskip("deepspeed")
    out = {}
    for i, (stage, mode, resume) in enumerate(RUNS):
        folder = tmp_path_factory.mktemp(f"zero{stage}-{mode}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29611 + i}", str(SCRIPT), str(folder),
               mode, str(CONFIGS / f"deepspeed_zero{stage}.json"), *(["resume"] if resume else [])]
        out[stage, mode] = _run(cmd, folder)
    return out


def _close(a, b) -> bool:
    return a is None and b is None or isinstance(a, str) and a == b or bool(np.allclose(a, b, rtol=RTOL, atol=ATOL))


def _same_weights(a: dict[str, float], b: dict[str, float], rtol: float = RTOL) -> list[str]:
    """The tensors whose sums differ."""
    return [name for name in a if not np.isclose(a[name], b[name], rtol=rtol, atol=1e-4 * rtol / RTOL)]


@pytest.mark.parametrize("stage,mode", [(s, m) for s, m, _ in RUNS])
def test_every_logged_metric_equals_the_one_process_run(alone, sharded, stage, mode):
    ranks = sharded[stage, mode]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["backend"] for r in ranks] == ["zero3" if stage == 3 else "deepspeed"] * 2
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank took the same decisions on the same numbers
    one, two = alone[mode]["history"], ranks[0]["history"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 4, 6, 8, 10]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        off = {k: (a[k], b[k]) for k in a if not _close(a[k], b[k])}
        assert not off, f"step {a['step']}: {off}"
    assert [loss for _, loss, _, _ in ranks[0]["losses"]] == pytest.approx([loss for _, loss, _, _ in alone[mode]["losses"]], rel=RTOL)
    assert not _same_weights(alone[mode]["weights"], ranks[0]["weights"])  # trained as in one process


@pytest.mark.parametrize("stage", [3, 2])
def test_the_anchors_gradient_reaches_the_deepspeed_step(alone, sharded, stage):
    history = sharded[stage, "regularize"][0]["history"]
    assert max(r["anchor_kl"] for r in history) > 0  # the anchor ran (its KL is 0 only on the base weights)
    # the anchor moved the weights away from the unguarded run's, and (test above) exactly as in one process
    assert [n for n in _same_weights(alone["monitor"]["weights"], sharded[stage, "regularize"][0]["weights"], 1e-6) if "mlp" in n]


@pytest.mark.parametrize("stage", [3, 2])
def test_frozen_slices_are_bitwise_unchanged_after_10_adamw_steps_while_other_weights_move(alone, sharded, stage):
    for run in (alone["freeze"], *sharded[stage, "freeze"]):
        assert run["frozen"] == 15 and run["frozen_intact"]
        assert run["frozen_equal"] and all(run["frozen_equal"])  # read from the gathered weights, against the initial ones
        assert len(run["moved"]) == 21  # every parameter tensor (the frozen ones hold only their frozen slices)


@pytest.mark.parametrize("mode", ["regularize", "freeze"])
def test_resuming_from_a_zero3_checkpoint_restores_the_guard_and_continues_the_same_run(sharded, mode):
    for rank in sharded[3, mode]:
        assert rank["resumed_history"] == rank["history"]  # steps 1-4 from the guard state, 6-10 measured again
        assert not _same_weights(rank["weights"], rank["resumed_weights"], 1e-6)  # model and optimizer from DeepSpeed's checkpoint
