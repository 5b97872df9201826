"""Launch recipes run on two CPU processes (gloo): Accelerate DDP (DeepSpeed ZeRO-2 and ZeRO-3: tests/test_deepspeed.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
