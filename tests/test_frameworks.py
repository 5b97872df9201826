"""The guard inside fine-tuning frameworks that build the Trainer themselves: Axolotl (its plugin system) and
LLaMA-Factory (``run_exp``'s callbacks), each through the framework's own training entry point on a tiny model.

Each framework pins its own transformers/TRL/PEFT, so these tests run in the framework's venv
(``bash .ci/frameworks`` builds both and runs this file there); in rimguard's own venv they are skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rimguard.probes.reasoning import problems
from rimguard.testing import tiny_model, tiny_tokenizer

# a random model has no consistent safety neurons: identify on a looser rule (as the quick start's tiny model does)
TINY_GUARD = {"mode": "regularize", "probe_every": 2, "min_share": 0.1, "top_m": 0.05, "max_length": 128}
STEPS = 4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "DISABLE_VERSION_CHECK": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": p.question, "input": "", "output": p.solution()} for p in problems(n)]


def guard_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rimguard.jsonl").read_text().splitlines()]


def assert_guarded(out: Path) -> None:
    """The guard identified its atlas, checked at its schedule and regularized from step 0."""
    events = guard_events(out)
    metrics = [e for e in events if e["event"] == "metrics"]
    assert [e["step"] for e in metrics] == [1, 2, 4], events
    assert all(e["safety_drop"] == e["safety_drop"] for e in metrics)  # measured, not NaN
    assert metrics[-1]["action"].startswith("regularize"), metrics[-1]
    assert (out / "rimguard_atlas" / "atlas.json").is_file()


# -- Axolotl -----------------------------------------------------------------------------------------


def axolotl_config(tmp_path: Path, model: Path, guard: dict) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in alpaca_rows(16)))
    cfg = {
        "base_model": str(model), "plugins": ["rimguard.integrations.axolotl.RIMGuardPlugin"], "rimguard": guard,
        "datasets": [{"path": str(data), "ds_type": "json", "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "val_set_size": 0, "sequence_len": 128, "sample_packing": False,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": STEPS, "num_epochs": 1, "learning_rate": 1e-4,
        "optimizer": "adamw_torch", "lr_scheduler": "constant", "bf16": False, "fp16": False, "tf32": False,
        "output_dir": str(tmp_path / "out"), "save_strategy": "steps", "save_steps": STEPS, "logging_steps": 1,
    }
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_axolotl_plugin_refuses_a_bad_guard_field_at_config_load(tmp_path, tiny_dir):
    pytest.importorskip("axolotl")
    from axolotl.cli.config import load_cfg

    with pytest.raises(Exception, match="probe_evry.*did you mean 'probe_every'"):
        load_cfg(str(axolotl_config(tmp_path, tiny_dir, {"probe_evry": 2})))
    cfg = load_cfg(str(axolotl_config(tmp_path, tiny_dir, TINY_GUARD)))
    assert dict(cfg.rimguard) == TINY_GUARD


def test_axolotl_train_entry_point_runs_the_guard(tmp_path, tiny_dir):
    pytest.importorskip("axolotl")
    config = axolotl_config(tmp_path, tiny_dir, TINY_GUARD)
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config)], capture_output=True, text=True,
                          timeout=900, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert_guarded(out)
    # attached to the trainer Axolotl built: the guard's metrics went through Trainer.log into its log history
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "rimguard/safety_drop" in e]
    assert [e["step"] for e in logged] == [1, 2, 4]


# -- LLaMA-Factory -----------------------------------------------------------------------------------


def llamafactory_config(tmp_path: Path, model: Path, guard: dict) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text(json.dumps(alpaca_rows(16)))
    (data / "dataset_info.json").write_text(json.dumps({"rim_sft": {"file_name": "train.json"}}))
    cfg = {
        "model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "rim_sft", "dataset_dir": str(data), "template": "default", "cutoff_len": 128, "overwrite_cache": True,
        "output_dir": str(tmp_path / "out"), "overwrite_output_dir": True, "max_steps": STEPS,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "use_cpu": True, "bf16": False, "fp16": False,
        "dataloader_num_workers": 0, "rimguard": guard,
    }
    path = tmp_path / "llamafactory.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_llamafactory_yaml_with_a_rimguard_section_runs_the_guard(tmp_path, tiny_dir):
    pytest.importorskip("llamafactory")
    config = llamafactory_config(tmp_path, tiny_dir, TINY_GUARD)
    proc = subprocess.run([sys.executable, "-m", "rimguard.integrations.llamafactory", str(config)], capture_output=True,
                          text=True, timeout=900, env=ENV, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rimguard: risk level" in proc.stdout and "action in force: regularize" in proc.stdout
    assert_guarded(tmp_path / "out")


def test_llamafactory_bad_guard_field_fails_before_anything_loads(tmp_path):
    from rimguard.config import ConfigError
    from rimguard.integrations.llamafactory import split_args

    rest, config = split_args({"stage": "sft", "rimguard": {"mode": "regularize", "probe_every": 3}})
    assert rest == {"stage": "sft"} and config.policy.mode == "regularize" and config.monitor.probe_every == 3
    with pytest.raises(ConfigError, match="probe_evry"):
        split_args({"stage": "sft", "rimguard": {"probe_evry": 3}})
    with pytest.raises(ConfigError, match="no such LLaMA-Factory config file"):
        split_args(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["axolotl_rimguard.yaml", "llamafactory_rimguard.yaml"])
def test_the_shipped_framework_examples_hold_a_valid_guard_section(name):
    from rimguard.integrations.llamafactory import split_args

    path = Path(__file__).resolve().parent.parent / "integrations" / name
    rest, config = split_args(path)
    assert config.policy.mode == "regularize" and "rimguard" not in rest and yaml.safe_load(path.read_text())["rimguard"]
