"""Two CPU ranks under torchrun (gloo): same decisions, frozen neurons intact everywhere, one writer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_guarded_run.py"


@pytest.mark.parametrize("family,port", [("llama", 29533), ("qwen2_moe", 29534)])  # dense; MoE with a shared expert
def test_torchrun_two_ranks(tmp_path, family, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(SCRIPT), str(tmp_path), family]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert [r["step"] for r in h0] == [1, 2, 4, 6]
    assert h0 == h1  # identical metrics and decisions on both ranks
    assert max(r["level"] for r in h0) >= 3 and ranks[0]["frozen"] == ranks[1]["frozen"]
    assert sum(len(f) for f in ranks[0]["frozen"]) > 0
    assert ranks[0]["frozen_intact"] and ranks[1]["frozen_intact"]
    assert ranks[0]["frozen_checksum"] == ranks[1]["frozen_checksum"]
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]  # DDP kept replicas in sync
    assert any(r.get("anchor_kl", 0) > 0 for r in h0)  # the safety anchor (escalate's regularizer) ran on both ranks
    events = [json.loads(l) for l in (tmp_path / "rimguard.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "start" for e in events) == 1  # only the main process writes
    assert [e["step"] for e in events if e["event"] == "metrics"] == [1, 2, 4, 6]


def test_an_identification_error_on_the_main_rank_is_raised_on_every_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    script = Path(__file__).parent / "scripts" / "ddp_identify_error.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29536", str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("AtlasError: ") and "do not fit max_length=16" in said[0]
