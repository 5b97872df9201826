"""The event log and the resume path never lose or duplicate what the guard saw."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rimguard import RIMGuard
from rimguard.events import EventLog, live_events, read_events
from rimguard.report import write_report
from rimguard.state import GuardStateError

SCRIPT = Path(__file__).parent / "scripts" / "killable_run.py"
VOLATILE = ("run_id", "time")


def _run(out, kill_at=0, resume=""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), str(out), str(kill_at), resume], env=env, capture_output=True, text=True,
                          timeout=600)


def _stable(events):
    return [{k: v for k, v in e.items() if k not in VOLATILE} for e in events if e["event"] in ("metrics", "level", "freeze")]


def test_sigkill_then_resume_logs_each_step_once_like_an_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = _run(tmp_path / "run", kill_at=10)
    assert killed.returncode == -9  # SIGKILL: no clean-up ran
    resumed = _run(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint-8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    raw = read_events(tmp_path / "run" / "rimguard.jsonl")
    events = live_events(raw)
    steps = [e["step"] for e in events if e["event"] == "metrics"]
    assert steps == list(range(1, 13))  # each step exactly once in the live view
    assert [e["step"] for e in raw if e["event"] == "metrics"][:10] == list(range(1, 11))  # the killed attempt's 9, 10 are kept
    assert len({e["run_id"] for e in events}) == 1  # the resume continues the same run
    assert _stable(events) == _stable(read_events(tmp_path / "whole" / "rimguard.jsonl"))


def test_half_written_last_line_is_skipped_and_reported(tmp_path, caplog):
    log = EventLog(tmp_path / "g.jsonl", run_id="abc")
    log.write({"event": "metrics", "step": 1, "x": 1.0})
    log.close()
    with open(tmp_path / "g.jsonl", "a") as fh:
        fh.write('{"event": "metrics", "st')
    assert [e["step"] for e in read_events(tmp_path / "g.jsonl")] == [1]
    assert "half-written" in caplog.text


def test_report_shows_the_last_run_and_picks_another(tmp_path):
    for run_id, value in (("first111", 1.0), ("second22", 5.0)):
        log = EventLog(tmp_path / "rimguard.jsonl", run_id=run_id)
        log.write({"event": "start", "step": 0, "thresholds": {}})
        for step in (1, 2):
            log.write({"event": "metrics", "step": step, "entanglement_z": value, "level": 0.0})
        log.close()
    _, md = write_report(tmp_path)
    assert "| entanglement_z | 5 | 5 | 5 |" in md.read_text() and "checks: 2" in md.read_text()
    _, md = write_report(tmp_path, run="first")
    assert "| entanglement_z | 1 | 1 | 1 |" in md.read_text() and "checks: 2" in md.read_text()
    with pytest.raises(ValueError, match="matches 0"):
        write_report(tmp_path, run="zzz")


def test_resume_without_guard_state_refuses_and_never_overwrites_the_atlas(tmp_path, tok, fast_config, llama_atlas):
    from rimguard.atlas import NeuronAtlas

    (tmp_path / "checkpoint-4").mkdir()
    llama_atlas.save(tmp_path / "rimguard_atlas")
    guard = RIMGuard(fast_config())
    with pytest.raises(GuardStateError, match="on_missing_state='atlas'"):
        guard.engine.restore(tmp_path / "checkpoint-4", 4, tmp_path)
    reuse = RIMGuard(fast_config(on_missing_state="atlas"))
    assert reuse.engine.restore(tmp_path / "checkpoint-4", 4, tmp_path) is None and reuse.atlas.same_selection(llama_atlas)
    # a different atlas goes to a new folder; the saved one stays
    other = NeuronAtlas.load(tmp_path / "rimguard_atlas")
    other.safety = other.safety.flip(0)
    from rimguard.state import save_atlas

    save_atlas(tmp_path, other)
    assert NeuronAtlas.load(tmp_path / "rimguard_atlas").same_selection(llama_atlas)
    assert NeuronAtlas.load(tmp_path / "rimguard_atlas-2").same_selection(other)


@pytest.mark.parametrize("bad, message", [
    ({"event": "metrics", "step": 2, "entanglement_z": "high", "level": 0.0}, "'entanglement_z' must be a number"),
    ({"event": "metrics", "entanglement_z": 1.0, "level": 0.0}, "'step' must be an integer"),
    ({"event": "metrics", "step": "2", "entanglement_z": 1.0}, "'step' must be an integer"),
    ({"event": "metrics", "step": 2, "entanglement_z": 1.0, "level": 9.0}, "'level' must be a level index"),
    ({"event": "level", "step": 2, "from": "ok", "to": "panic"}, "'to' must be one of"),
    (["not", "a", "record"], "expected a JSON object"),
])
def test_report_on_malformed_records_is_one_clear_error(tmp_path, bad, message):
    import json

    lines = [{"event": "start", "step": 0, "thresholds": {}}, {"event": "metrics", "step": 1, "entanglement_z": 0.5, "level": 0.0}, bad]
    (tmp_path / "rimguard.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ValueError, match=message) as err:
        write_report(tmp_path)
    assert "record 3" in str(err.value) and "rimguard.jsonl" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "rimguard.cli", "report", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr
