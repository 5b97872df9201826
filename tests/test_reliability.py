"""Reliability, round 2 (issue #22): the bad-input and fault cases, each through the public API or the CLI.

docs/reliability.md lists every case with its behaviour and the test here that pins it.
"""

import time

import pytest
import torch

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


# -- identification ----------------------------------------------------------------------------
def test_probes_that_do_not_fit_max_length_are_refused(tok):
    from rimguard import NeuronAtlas
    from rimguard.atlas.core import AtlasError
    from rimguard.probes import bundled
    from rimguard.testing import tiny_model

    long = [f"{p} " + "Please explain every detail of it at great length. " * 8 for p in bundled("harmful")[:4]]
    with pytest.raises(AtlasError, match="do not fit max_length=64 tokens as prompt .* raise max_length"):
        NeuronAtlas.identify(tiny_model("llama"), tok, long, bundled("intent"), top_m=4, min_share=0.25, num_controls=2,
                             max_new_tokens=2, max_length=64, progress=False)
    with pytest.raises(AtlasError, match="as prompt with its response"):  # the prompts fit, the responses do not
        NeuronAtlas.identify(tiny_model("llama"), tok, bundled("harmful")[:4], bundled("intent"), top_m=4, min_share=0.25,
                             num_controls=2, max_new_tokens=40, max_length=100, progress=False)


def test_nan_weights_are_refused_at_identification_and_by_the_cli(tmp_path, tok, capsys):
    from rimguard import NeuronAtlas
    from rimguard.atlas.core import AtlasError
    from rimguard.cli import main
    from rimguard.probes import bundled
    from rimguard.testing import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(AtlasError, match="weights hold NaN or inf values .*layers.1.mlp.up_proj.weight"):
        NeuronAtlas.identify(model, tok, bundled("harmful")[:4], bundled("intent"), top_m=4, min_share=0.25, num_controls=2,
                             max_new_tokens=2, max_length=128, progress=False)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    code = main(["identify", str(folder), "-o", str(tmp_path / "atlas"), "--num-safety-probes", "4", "--max-new-tokens", "2",
                 "--max-length", "128", "--top-m", "4", "--min-share", "0.25", "--num-controls", "2"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it: the progress bars of the save and load)
    assert code == 2 and last.startswith("rimguard identify: error: the model's weights hold NaN") and "Traceback" not in err
    assert not (tmp_path / "atlas").exists()


def test_the_harmful_side_streams_and_chunked_sums_give_the_same_selection(tok, monkeypatch):
    from rimguard import NeuronAtlas
    from rimguard.atlas import core, selection
    from rimguard.probes import bundled
    from rimguard.testing import tiny_model

    gen = torch.Generator().manual_seed(0)
    base, other = torch.randn(10, 30, generator=gen), torch.randn(10, 30, generator=gen)
    whole = selection.counterfactual(base, other, 5, 0.3)
    parts = selection.PairTally.of(base[:4], other[:4], 5).plus(selection.PairTally.of(base[4:], other[4:], 5))
    chunked = selection.select_counterfactual(parts, 5, 0.3)
    assert torch.equal(whole.chosen, chunked.chosen)
    torch.testing.assert_close(whole.ranking, chunked.ranking)

    rows = []
    measured = core.activations

    def counting(*args, **kwargs):
        out = measured(*args, **kwargs)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(core, "activations", counting)
    monkeypatch.setattr(core, "PAIR_CHUNK", 4)
    harmful = bundled("harmful")[:10]
    atlas = NeuronAtlas.identify(tiny_model("llama"), tok, harmful, bundled("intent"), top_m=6, min_share=0.2, num_controls=2,
                                 max_new_tokens=2, max_length=128, progress=False)
    assert rows == [4, 4, 4, 4, 2, 2] and atlas.num_safety > 0  # chunks of 4 pairs, each side: never all 10 at once
