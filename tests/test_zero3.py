"""DeepSpeed ZeRO-3 on two CPU ranks (gloo, DeepSpeed's CPU accelerator) through the HF Trainer and ``RIMGuard.attach``:
the guard's numbers are those of one plain process on the same data (tests/scripts/zero3_trainer_run.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "zero3_trainer_run.py"
CONFIG = Path(__file__).resolve().parent.parent / "integrations" / "deepspeed_zero3.json"
MODES = ("monitor", "regularize", "freeze")
RESUMED = ("regularize", "freeze")  # the modes whose guard state holds more than references: the anchor's record, the frozen set
RTOL, ATOL = 1e-3, 1e-6  # float noise of 10 AdamW steps, summed in another order over partitions


def _run(cmd: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    pytest.importorskip("deepspeed")
    out = {}
    for i, mode in enumerate(MODES):
        one, two = tmp_path_factory.mktemp(f"one-{mode}"), tmp_path_factory.mktemp(f"zero3-{mode}")
        alone = _run([sys.executable, str(SCRIPT), str(one), mode, "none"], one)
        resume = ["resume"] if mode in RESUMED else []  # a checkpoint at step 4, and a second Trainer resumed from it
        sharded = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29611 + i}", str(SCRIPT),
                        str(two), mode, str(CONFIG), *resume], two)
        out[mode] = (alone[0], sharded)
    return out


def _close(a, b) -> bool:
    return a is None and b is None or isinstance(a, str) and a == b or bool(np.allclose(a, b, rtol=RTOL, atol=ATOL))


@pytest.mark.parametrize("mode", MODES)
def test_every_logged_metric_equals_the_one_process_run(runs, mode):
    alone, ranks = runs[mode]
    assert [r["backend"] for r in ranks] == ["zero3", "zero3"] and [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank took the same decisions on the same numbers
    one, two = alone["history"], ranks[0]["history"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 4, 6, 8, 10]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        off = {k: (a[k], b[k]) for k in a if not _close(a[k], b[k])}
        assert not off, f"step {a['step']}: {off}"
    assert [loss for _, loss, _, _ in alone["losses"]] == pytest.approx([loss for _, loss, _, _ in ranks[0]["losses"]], rel=RTOL)


def test_the_anchors_gradient_reaches_the_zero3_step_as_in_one_process(runs):
    alone, ranks = runs["regularize"]
    assert max(r["anchor_kl"] for r in ranks[0]["history"]) > 0  # the anchor ran (its KL is 0 only on the base weights)
    trained, monitored = ranks[0]["weights"], runs["monitor"][1][0]["weights"]
    moved_by_anchor = [n for n in trained if "mlp" in n and not np.isclose(trained[n], monitored[n], rtol=1e-6, atol=1e-7)]
    assert moved_by_anchor  # the anchor's gradient changed the trained weights
    for name, value in alone["weights"].items():  # and changed them as it does in one process
        assert np.isclose(trained[name], value, rtol=RTOL, atol=1e-4), name


def test_frozen_slices_are_bitwise_unchanged_after_10_adamw_steps_while_other_weights_move(runs):
    alone, ranks = runs["freeze"]
    for run in (alone, *ranks):
        assert run["frozen"] == 15 and run["frozen_intact"]
        assert run["frozen_equal"] and all(run["frozen_equal"])  # read from the gathered weights, against the initial ones
        assert len(run["moved"]) == 21  # every parameter tensor (the frozen ones hold only their frozen slices)
    for name, value in alone["weights"].items():
        assert np.isclose(ranks[0]["weights"][name], value, rtol=RTOL, atol=1e-4), name


@pytest.mark.parametrize("mode", RESUMED)
def test_resuming_from_a_zero3_checkpoint_restores_the_guard_and_continues_the_same_run(runs, mode):
    for rank in runs[mode][1]:
        assert rank["resumed_history"] == rank["history"]  # steps 1-4 from the guard state, 6-10 measured again
        for name, value in rank["weights"].items():  # the model and optimizer came back from DeepSpeed's checkpoint too
            assert np.isclose(rank["resumed_weights"][name], value, rtol=1e-6, atol=1e-7), name
