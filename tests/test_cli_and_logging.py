"""The rimguard executable end to end, config files, and TensorBoard logging through report_to."""

import json
import subprocess
import sys

import pytest
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rimguard import ConfigError, GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

EXE = [sys.executable, "-m", "rimguard.cli"]


def run(*args):
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_identify_inspect(tmp_path, model_dir):
    cfg = tmp_path / "cfg.yaml"
    GuardConfig(num_safety_probes=8, max_new_tokens=4, top_m=10, min_share=0.25, num_controls=4).save(cfg)
    proc = run("identify", model_dir, "--config", cfg, "-o", tmp_path / "atlas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "atlas" / "atlas.safetensors").is_file()
    proc = run("inspect", tmp_path / "atlas")
    assert proc.returncode == 0 and "safety-critical neurons" in proc.stdout and "L0:" in proc.stdout + "L1:"


@pytest.mark.parametrize("args,message", [
    (["inspect", "/nonexistent"], "not an atlas folder"),
    (["report", "/nonexistent"], "no rimguard log"),
    (["identify", "/nonexistent", "-o", "x"], "no such model folder"),
    (["demo", "--model", "/nonexistent"], "not a model folder"),
])
def test_user_errors_are_one_line(args, message):
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_demo_end_to_end_on_a_tiny_model(tmp_path, model_dir):
    """`rimguard demo` runs the README's main job, the unguarded and the guarded fine-tune side by side; --model swaps
    the aligned SmolLM2 for a tiny one."""
    out, cfg = tmp_path / "demo", tmp_path / "guard.json"
    GuardConfig(max_new_tokens=4, top_m=10, min_share=0.25, num_controls=4, max_length=128, kl_probes=2).save(cfg)
    proc = run("demo", "--model", model_dir, "--config", cfg, "--steps", 4, "--probe-every", 2, "--num-safety-probes", 4,
               "--mode", "escalate", "--batch-size", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out harmful refused" in proc.stdout and "probe_refusal" in proc.stdout  # the table and the live rows
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert list(runs) == ["unguarded", "escalate"] and [r["mode"] for r in runs.values()] == ["monitor", "escalate"]
    for name, r in runs.items():
        assert [h["step"] for h in r["history"]] == [1, 2, 4]  # checks at 1, 2, then every --probe-every
        assert r["after"]["refusal"]["n"] == summary["before"]["refusal"]["n"] == len(r["after"]["refusal"]["samples"]) == 24
        assert r["after"]["over_refusal"]["n"] == 24 and r["after"]["task_loss"] < summary["before"]["task_loss"]  # it learned
        assert any(e.get("event") == "metrics" for e in map(json.loads, (out / name / "rimguard.jsonl").read_text().splitlines()))
    assert runs["unguarded"]["action"] == "none (monitor only)" and runs["unguarded"]["gain_share"] == 1.0
    # one atlas for both runs: the second loaded the first's neurons
    assert runs["unguarded"]["num_safety_neurons"] == runs["escalate"]["num_safety_neurons"]
    assert (out / "unguarded" / "rimguard_atlas" / "atlas.json").is_file() and not (out / "escalate" / "rimguard_atlas").exists()
    assert (out / "rimguard_demo.png").stat().st_size > 10_000


def test_the_demo_judges_prompts_the_guard_never_measures():
    """The guard's probes are the alignment prompts; the demo's evaluation is the held-out rest: disjoint sets."""
    from rimguard.demo.app import HeldOut, guard_prompts

    probes, held = guard_prompts(), HeldOut(tiny_tokenizer())
    assert not set(probes["safety_prompts"]) & set(held.harmful) and not set(probes["harmless_prompts"]) & set(held.harmless)
    assert len(held.harmful) == len(held.harmless) == 24 and len(probes["safety_prompts"]) == 72


def test_guarded_run_tensorboard_and_report(tmp_path):
    """A guard attached to its trainer sends rimguard/* scalars through Trainer.log to report_to."""
    config = GuardConfig(num_safety_probes=8, max_new_tokens=4, top_m=10, min_share=0.25, num_controls=4, max_length=128,
                         kl_probes=2, probe_every=4, mode="escalate",
                         thresholds={"warn": {"task_rise": 0.0}, "regularize": {}, "freeze": {}, "stop": {}})
    args = SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                     report_to=["tensorboard"], bf16=False, **no_checkpointing(),
                     save_strategy="no", use_cpu=True, max_length=64, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(reasoning_texts(16)),
                         processing_class=tiny_tokenizer())
    RIMGuard.attach(trainer, config)
    trainer.train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(tmp_path.rglob("events.out.tfevents*"))
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/rimguard/ras_safe", "train/rimguard/entanglement_z", "train/rimguard/level"} <= tags
    proc = run("report", tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "rimguard_report.png").stat().st_size > 10_000
    md = (tmp_path / "rimguard_report.md").read_text()
    assert "level ok -> warn" in md and "| ras_safe |" in md


def test_config_roundtrip_and_validation(tmp_path):
    cfg = GuardConfig(mode="escalate", probe_every=7, thresholds={"warn": {"kl_task": 0.1}})
    assert cfg.policy.mode == "escalate" and cfg.monitor.probe_every == 7  # flat keywords land in their sections
    for name in ("c.yaml", "c.json"):
        cfg.save(tmp_path / name)
        assert GuardConfig.load(tmp_path / name) == cfg
    assert GuardConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) == {"atlas", "monitor", "policy", "actions", "seed"}
    with pytest.raises(ConfigError, match="unknown field.*'probe_evry' \\(did you mean 'probe_every'\\?\\)"):
        GuardConfig.from_dict({"probe_evry": 3})
    with pytest.raises(ConfigError, match=r"GuardConfig.monitor: unknown field\(s\) \['top_m'\]"):
        GuardConfig.from_dict({"monitor": {"top_m": 3}})  # a field in the wrong section
    with pytest.raises(ConfigError, match="GuardConfig.atlas.min_share: must be <= 1"):
        GuardConfig(min_share=1.5)
    with pytest.raises(ConfigError, match="unknown metric 'loss'"):
        GuardConfig(thresholds={"warn": {"loss": 1.0}})
    with pytest.raises(ConfigError, match="levels must rise"):
        GuardConfig(thresholds={"warn": {"entanglement_z": 3.0}, "regularize": {"entanglement_z": 2.0}})
    with pytest.raises(ConfigError, match="GuardConfig.policy.level_actions: unknown actions"):
        GuardConfig(level_actions={"warn": ["explode"]})
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: top level must be a mapping"):
        GuardConfig.load(tmp_path / "bad.yaml")


def test_config_reads_flat_nested_and_section_objects_alike(tmp_path):
    from rimguard.config import ActionsConfig, MonitorConfig

    flat = GuardConfig(probe_every=5, regularizer="params", level_actions={"warn": ["warn", "regularize"]}, seed=3)
    nested = GuardConfig.from_dict({"monitor": {"probe_every": 5}, "actions": {"regularizer": "params"},
                                    "policy": {"level_actions": {"warn": ["warn", "regularize"]}}, "seed": 3})
    objects = GuardConfig(monitor=MonitorConfig(probe_every=5), actions=ActionsConfig(regularizer="params"), seed=3,
                          level_actions={"warn": ["warn", "regularize"]})
    assert flat == nested == objects
    assert flat.actions.reg_lambda is None and flat.policy.actions_for("warn") == ["warn", "regularize"]
    with pytest.raises(ConfigError, match="'penalty_weight' \\(did you mean 'reg_lambda'"):  # renamed fields name the new one
        GuardConfig(penalty_weight=1.0)
    with pytest.raises(ConfigError, match="must be one of"):  # a regularizer name is checked against the registry
        GuardConfig(regularizer="anchors")
    # a flat key wins over the section it belongs to; replace() validates
    assert GuardConfig(monitor={"probe_every": 5}, probe_every=9).monitor.probe_every == 9
    with pytest.raises(ConfigError, match="GuardConfig.monitor.probe_every: must be >= 1"):
        flat.replace(probe_every=0)
    # a config file written before the sections existed (flat, with a per-level 'actions' map) still loads
    (tmp_path / "old.yaml").write_text("mode: escalate\nprobe_every: 4\nactions: {warn: [warn, stop]}\nanchor_every: 2\n")
    old = GuardConfig.load(tmp_path / "old.yaml")
    assert (old.policy.mode, old.monitor.probe_every, old.actions.anchor_every) == ("escalate", 4, 2)
    assert old.policy.actions_for("warn") == ["warn", "stop"]


def test_config_flags_are_generated_from_the_fields():
    import argparse

    from rimguard.config import OWNER, add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--probe-every", "3", "--mode", "escalate", "--reg-lambda", "none", "--adaptive-lambda", "yes",
                              "--thresholds", "{warn: {kl_task: 0.2}}", "--log-file", "none", "--seed", "4"])
    cfg = from_arguments(args, GuardConfig(reg_lambda=2.0, top_m=7))
    assert (cfg.monitor.probe_every, cfg.policy.mode, cfg.actions.reg_lambda, cfg.actions.adaptive_lambda) == (3, "escalate", None, True)
    assert cfg.policy.thresholds == {"warn": {"kl_task": 0.2}} and cfg.monitor.log_file is None and cfg.seed == 4
    assert cfg.atlas.top_m == 7  # not passed: the base's value stays
    helps = {a.dest: a.help for a in parser._actions}
    assert set(OWNER) <= set(helps) and all(helps[name] for name in OWNER)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "panic"])  # Literal choices are the flag's choices


@pytest.mark.parametrize("text, field, message", [
    ("thresholds: {warn: 2.0}", "policy.thresholds", "'warn' must map metric names to values"),
    ("probe_every: '10'", "monitor.probe_every", "must be an integer"),
    ("num_controls: 2.5", "atlas.num_controls", "must be an integer"),
    ("seed: abc", "seed", "must be an integer"),
    ("adaptive_lambda: 'no'", "actions.adaptive_lambda", "must be true or false"),
    ("ema_decay: .nan", "monitor.ema_decay", "must be a finite number"),
    ("mode: 3", "policy.mode", "must be one of 'monitor', 'regularize', 'freeze', 'escalate'"),
    ("policy: {mode: panic}", "policy.mode", "must be one of"),
    ("actions: {warn: warn}", "policy.level_actions", "'warn' must be a list of action names"),
])
def test_config_values_of_the_wrong_type_name_the_field(tmp_path, text, field, message):
    """A YAML file's wrongly typed value is one ConfigError naming the field, never a deep traceback
    nor a string taken as truthy."""
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"GuardConfig.{field}: {message}"):
        GuardConfig.load(tmp_path / "c.yaml")


def test_demo_keeps_the_config_files_settings_unless_a_flag_is_passed(tmp_path, model_dir):
    out, cfg = tmp_path / "demo", tmp_path / "guard.json"
    GuardConfig(max_new_tokens=4, top_m=10, min_share=0.25, num_controls=4, max_length=128, kl_probes=2, mode="freeze",
                probe_every=3, num_safety_probes=4).save(cfg)
    proc = run("demo", "--model", model_dir, "--config", cfg, "--steps", 3, "--batch-size", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert runs["freeze"]["mode"] == "freeze" and runs["freeze"]["frozen"] > 0  # the file's mode, not the demo's default
    assert [h["step"] for h in runs["freeze"]["history"]] == [1, 2, 3]  # the file's probe_every=3
    assert "freeze (" in proc.stdout


def test_demo_help_lists_the_demo_flags():
    proc = run("demo", "--help")
    assert proc.returncode == 0 and all(flag in proc.stdout for flag in ("--mode", "--out", "--model", "--config", "--threads"))


def test_identify_checks_probe_files_before_loading_the_model(tmp_path, model_dir):
    proc = run("identify", model_dir, "--safety", tmp_path / "missing.csv", "-o", tmp_path / "atlas")
    assert proc.returncode == 2 and "missing.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_points_a_run_folder_to_its_atlas(tmp_path, llama_atlas):
    llama_atlas.save(tmp_path / "rimguard_atlas")
    proc = run("inspect", tmp_path)
    assert proc.returncode == 2 and "rimguard inspect" in proc.stderr and "rimguard_atlas" in proc.stderr


def test_reduced_precision_identification_warns_once(tok, fast_config, caplog):
    import contextlib
    import logging

    import torch

    from rimguard.atlas import AtlasError, NeuronAtlas
    from rimguard.testing import tiny_model

    guard = RIMGuard(fast_config(min_share=0.1, top_m=0.05), tokenizer=tok)
    with caplog.at_level(logging.WARNING, logger="rimguard"), contextlib.suppress(AtlasError):  # the warning comes first
        NeuronAtlas.from_config(tiny_model("llama").to(torch.bfloat16), tok, guard.config)
    assert sum("under bfloat16" in r.getMessage() for r in caplog.records) == 1


def test_report_panels_lead_with_the_alarm_and_show_actions_only_when_they_acted():
    from rimguard.report import panels_for, summarize

    monitored = [{"event": "metrics", "step": s, "safety_drop": 0.1 * s, "ras_safe": 0.01, "entanglement_z": 1.0,
                  "level": 0.0, "reg_lambda": 0.0, "frozen": 0} for s in (1, 2, 4)]
    keys = [p.key for p in panels_for(monitored)]
    assert keys[0] == "safety_drop" and "reg_lambda" not in keys and "frozen" not in keys and "level" in keys
    regularized = [{**m, "reg_lambda": 1.0, "anchor_kl": 0.02} for m in monitored]
    keys = [p.key for p in panels_for(regularized)]
    assert "reg_lambda" in keys and "anchor_kl" in keys and "activation_penalty" not in keys
    assert "| safety_drop | 0.1 | 0.4 | 0.4 |" in summarize(regularized)
