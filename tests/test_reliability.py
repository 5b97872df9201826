"""Reliability, round 2 (issue #22): the bad-input and fault cases, each through the public API or the CLI.

docs/reliability.md lists every case with its behaviour and the test here that pins it.
"""

import time

import pytest

from rimguard import ConfigError, GuardConfig


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric, off", [("kl_task", {"kl_probes": 0}), ("refusal_drop", {"margin_probes": 0}),
                                         ("refusal_kl", {"refusal_kl": False}), ("probe_refusal_drop", {"witness_tokens": 0})])
def test_a_threshold_on_a_metric_the_config_turns_off_is_refused(metric, off):
    GuardConfig(thresholds={"warn": {metric: 0.5}})  # measured by default: accepted
    name = next(iter(off))
    with pytest.raises(ConfigError, match=f"'warn.{metric}' can never fire: monitor.{name}="):
        GuardConfig(thresholds={"warn": {metric: 0.5}}, **off)
    GuardConfig(**off)  # turning the metric off is fine when nothing reads it


def test_counts_are_whole_numbers_and_responses_have_a_token():
    with pytest.raises(ConfigError, match="top_m: a count .* must be a whole number"):
        GuardConfig(top_m=5.7)
    assert GuardConfig(top_m=5.0).atlas.top_m == 5 and GuardConfig(top_m=0.3).atlas.top_m == 0.3
    with pytest.raises(ConfigError, match="atlas.max_new_tokens: must be >= 1"):
        GuardConfig(max_new_tokens=0)


def test_a_yaml_alias_chain_gives_a_short_error_quickly(tmp_path):
    chain = ["&a0 [x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"probe_every: [{', '.join(chain)}]\n")  # 9^9 entries when printed in full
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="GuardConfig.monitor.probe_every: must be an integer") as err:
        GuardConfig.load(path)
    assert time.perf_counter() - t0 < 5 and len(str(err.value)) < 400


def test_config_files_by_suffix_case_and_content(tmp_path):
    (tmp_path / "guard.YAML").write_text("probe_every: 7\n")
    assert GuardConfig.load(tmp_path / "guard.YAML").monitor.probe_every == 7
    (tmp_path / "guard.cfg").write_text('{"probe_every": 3}')  # JSON is YAML too
    assert GuardConfig.load(tmp_path / "guard.cfg").monitor.probe_every == 3
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        GuardConfig.load(tmp_path)
    (tmp_path / "guard.bin").write_bytes(b"\xff\xfe\x00\x81" * 8)
    with pytest.raises(ConfigError, match="guard.bin: not a text file"):
        GuardConfig.load(tmp_path / "guard.bin")
