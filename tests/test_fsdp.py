"""FSDP2 (``fully_shard``) on two CPU ranks (gloo): the guard's numbers are those of one process on the same data.

One script (tests/scripts/fsdp_guarded_loop.py) drives the documented custom loop in ``mode="monitor"``,
``"regularize"`` (the safety anchor) and ``"freeze"``, once alone and once under torchrun with every decoder
layer and the model sharded; each run also resumes from the sharded checkpoint and guard state it saved half-way.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_guarded_loop.py"
MODES = ("monitor", "regularize", "freeze")
RTOL, ATOL = 1e-3, 1e-6  # float noise of 10 AdamW steps at lr 2e-3, summed in another order over shards


def _run(cmd: list[str], out: Path) -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {mode: json.loads((out / f"{mode}.json").read_text()) for mode in MODES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    one = _run([sys.executable, str(SCRIPT)], tmp_path_factory.mktemp("one"))
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541", str(SCRIPT)],
               tmp_path_factory.mktemp("fsdp"))
    return one, two


def _close(a, b) -> bool:
    return a is None and b is None or isinstance(a, str) and a == b or bool(np.allclose(a, b, rtol=RTOL, atol=ATOL))


@pytest.mark.parametrize("mode", MODES)
def test_every_logged_metric_equals_the_one_process_run(runs, mode):
    one, two = runs[0][mode]["history"], runs[1][mode]["history"]
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 4, 6, 8, 10]
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        off = {k: (a[k], b[k]) for k in a if not _close(a[k], b[k])}
        assert not off, f"step {a['step']}: {off}"
    assert "ras_safe" in one[-1] and "safety_drop" in one[-1]


def test_the_anchors_gradient_equals_the_one_process_gradient(runs):
    one, two = runs[0]["regularize"], runs[1]["regularize"]
    assert max(r["anchor_kl"] for r in two["history"]) > 0  # the anchor ran (its KL is 0 only on the base weights)
    assert one["anchor_grad"].keys() == two["anchor_grad"].keys() and len(one["anchor_grad"]) == 6  # 2 layers x 3 MLP weights
    for name, grad in one["anchor_grad"].items():
        a, b = np.array(grad), np.array(two["anchor_grad"][name])
        assert np.abs(a).max() > 0
        assert np.allclose(a, b, rtol=RTOL, atol=RTOL * np.abs(a).max()), name


def test_frozen_slices_are_bitwise_unchanged_after_10_adamw_steps_while_other_weights_move(runs):
    for run in runs:
        freeze = run["freeze"]
        assert freeze["frozen"] == 15 and freeze["frozen_intact"] and freeze["frozen_unchanged"]
        assert len(freeze["moved"]) == 21  # every parameter tensor (the frozen ones hold only their frozen slices)
    assert np.allclose(list(runs[0]["freeze"]["weights"].values()), list(runs[1]["freeze"]["weights"].values()), rtol=RTOL)


def test_the_freezes_step_work_has_no_op_that_syncs_with_the_host(runs):
    """No ``nonzero`` (boolean-mask indexing runs one) and no scalar read: on a GPU each would wait for the device."""
    for run in runs:
        ops = run["freeze"]["freeze_step_ops"]
        assert "aten::index_put_" in ops  # the write-back ran, by index
        assert not {"aten::nonzero", "aten::_local_scalar_dense", "aten::item"} & set(ops), ops


@pytest.mark.parametrize("mode", MODES)
def test_resuming_from_a_sharded_checkpoint_continues_the_same_run(runs, mode):
    for run in runs:  # model and optimizer from torch.distributed.checkpoint, the guard from its state, at step 4
        assert run[mode]["resumed_history"] == run[mode]["history"]
        assert run[mode]["resumed_weights"] == pytest.approx(run[mode]["weights"], rel=1e-6)


TRAINER_SCRIPT = Path(__file__).parent / "scripts" / "fsdp_trainer_run.py"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the HF Trainer runs FSDP on GPUs only (DDP on CPU)")
@pytest.mark.parametrize("mode", MODES)
def test_the_trainer_path_under_fsdp2_on_gpus(tmp_path, mode):
    import torch

    ranks = min(2, torch.cuda.device_count())
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port=29542", str(TRAINER_SCRIPT),
           str(tmp_path), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert all(s["sharded"] for s in seen)  # the Trainer's model is FSDP2's: DTensor parameters
    assert all(s["history"] == seen[0]["history"] for s in seen) and [r["step"] for r in seen[0]["history"]] == [1, 2, 4, 6]
    if mode == "regularize":
        assert max(r["anchor_kl"] for r in seen[0]["history"]) > 0
    if mode == "freeze":
        assert seen[0]["frozen"] > 0 and all(s["frozen_intact"] for s in seen)
