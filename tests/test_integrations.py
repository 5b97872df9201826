"""Launch recipes run on two CPU processes (gloo): Accelerate DDP, and DeepSpeed ZeRO-2 with the HF Trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_accelerate_ddp_recipe(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--config_file", str(ROOT / "integrations" / "accelerate_ddp.yaml"), "--mixed_precision", "no",
           "--main_process_port", "29571", str(ROOT / "integrations" / "train_sft.py"), "--model", "tiny", "--cpu", "--steps", "6",
           "--mode", "freeze", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world_size=2" in proc.stdout
    events = [json.loads(l) for l in (tmp_path / "rimguard.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "start" for e in events) == 1
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 2, 4, 5, 6]
    assert all(e["frozen"] > 0 for e in events if e["event"] == "metrics")


def _deepspeed_run(tmp_path, mode, port):
    pytest.importorskip("deepspeed")
    out = tmp_path / mode
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "scripts" / "deepspeed_guarded_run.py"), str(out), str(ROOT / "integrations" / "deepspeed_zero2.json"), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_deepspeed_zero2_recipe_on_cpu(tmp_path):
    """The ZeRO-2 recipe with HF Trainer on 2 CPU ranks: ranks agree, and the penalty changes training."""
    regularized = _deepspeed_run(tmp_path, "regularize", 29591)
    monitored = _deepspeed_run(tmp_path, "monitor", 29592)
    for ranks in (regularized, monitored):
        assert all(r["deepspeed"] and r["world"] == 2 for r in ranks)
        assert ranks[0]["history"] == ranks[1]["history"]
    reg, mon = regularized[0]["history"], monitored[0]["history"]
    assert [h["step"] for h in reg] == [h["step"] for h in mon] == [1, 2, 4, 6]
    assert all(h["reg_lambda"] == 1.0 for h in reg) and all(h["activation_penalty"] > 0 for h in reg[1:])
    assert reg[0]["ras_safe"] == mon[0]["ras_safe"]  # before any update the two runs agree
    assert reg[-1]["ras_safe"] != mon[-1]["ras_safe"]  # the penalty's gradient reached the DeepSpeed engine
