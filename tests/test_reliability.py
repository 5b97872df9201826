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


# -- the log: append-only, never through a link, a torn line survived ---------------------------------
def test_a_new_run_after_a_torn_line_starts_on_its_own_line_and_both_runs_report(tmp_path, caplog):
    from rimguard.events import EventLog, read_events
    from rimguard.report import write_report

    first = EventLog(tmp_path / "rimguard.jsonl", run_id="first111")
    first.write({"event": "start", "step": 0, "thresholds": {}})
    first.write({"event": "metrics", "step": 1, "safety_drop": 0.1, "level": 0.0})
    first.close()
    with open(tmp_path / "rimguard.jsonl", "a") as fh:
        fh.write('{"event": "metrics", "step": 2, "safe')  # the disk filled mid-record
    second = EventLog(tmp_path / "rimguard.jsonl", run_id="second22")
    second.write({"event": "start", "step": 0, "thresholds": {}})
    second.write({"event": "metrics", "step": 1, "safety_drop": 0.7, "level": 0.0})
    second.close()
    events = read_events(tmp_path / "rimguard.jsonl")
    assert [e["run_id"] for e in events if e["event"] == "start"] == ["first111", "second22"] and "half-written" in caplog.text
    assert "| safety_drop | 0.7 |" in write_report(tmp_path)[1].read_text()
    assert "| safety_drop | 0.1 |" in write_report(tmp_path, run="first")[1].read_text()


def test_the_log_and_the_report_never_write_through_a_symlink(tmp_path):
    from rimguard.events import EventLog
    from rimguard.report import write_report

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / "rimguard.jsonl").symlink_to(target)
    with pytest.raises(OSError, match="is a symlink"):
        EventLog(run / "rimguard.jsonl", run_id="r").write({"event": "start", "step": 0})
    (run / "rimguard.jsonl").unlink()
    log = EventLog(run / "rimguard.jsonl", run_id="r")
    log.write({"event": "start", "step": 0, "thresholds": {}})
    log.write({"event": "metrics", "step": 1, "safety_drop": 0.2, "level": 0.0})
    log.close()
    (run / "rimguard_report.md").symlink_to(target)
    write_report(run)
    assert target.read_text() == "keep me" and not (run / "rimguard_report.md").is_symlink()


@pytest.mark.parametrize("name", ["../x.jsonl", "/tmp/x.jsonl", "logs/x.jsonl", ".."])
def test_log_file_is_a_name_in_the_run_folder(name):
    with pytest.raises(ConfigError, match="log_file: must be a file name in output_dir"):
        GuardConfig(log_file=name)
    GuardConfig(log_file="mine.jsonl")


# -- resume ----------------------------------------------------------------------------------------
def _log(folder):
    from rimguard.events import read_events

    return read_events(folder / "rimguard.jsonl")


def test_a_finished_run_resumed_from_an_earlier_checkpoint_keeps_every_record(tmp_path, tok, fast_config):
    from rimguard.events import live_events
    from rimguard.report import write_report
    from tests.test_resume import run

    run(tmp_path, tok, fast_config, 8)
    first = _log(tmp_path)
    run(tmp_path, tok, fast_config, 8, resume=str(tmp_path / "checkpoint-4"))
    raw = _log(tmp_path)
    assert raw[: len(first)] == first  # nothing deleted or rewritten: the first attempt's steps 6, 8 and end are kept
    steps = [e["step"] for e in live_events(raw) if e["event"] == "metrics"]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # the live view: each step once
    assert [e["step"] for e in live_events(raw) if e["event"] == "end"] == [8] and sum(e["event"] == "end" for e in raw) == 2
    write_report(tmp_path)


def test_resume_reads_the_checkpoint_the_trainer_resumes_from(tmp_path, tok, fast_config):
    from tests.test_resume import run

    part, _ = run(tmp_path / "a", tok, fast_config, 4)
    resumed, trainer = run(tmp_path / "b", tok, fast_config, 8, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert trainer.state.global_step == 8 and resumed.engine.run_id == part.engine.run_id
    assert resumed.history[: len(part.history)] == part.history  # the state of a/checkpoint-4, not a fresh start
    assert [e["step"] for e in _log(tmp_path / "b") if e["event"] == "resume"] == [4]


def test_another_runs_guard_state_is_refused(tmp_path, tok, fast_config):
    import json
    import shutil

    from rimguard.state import GuardStateError
    from tests.test_resume import run

    run(tmp_path / "a", tok, fast_config, 4)
    run(tmp_path / "b", tok, fast_config, 4)
    state = tmp_path / "b" / "checkpoint-4" / "trainer_state.json"
    saved = json.loads(state.read_text())
    saved["log_history"].append({"loss": 2.5, "step": 2})  # b logged what a did not: another run
    state.write_text(json.dumps(saved))
    shutil.rmtree(tmp_path / "b" / "checkpoint-4" / "rimguard")
    shutil.copytree(tmp_path / "a" / "checkpoint-4" / "rimguard", tmp_path / "b" / "checkpoint-4" / "rimguard")  # a's state in b
    before = (tmp_path / "b" / "rimguard.jsonl").read_text()
    with pytest.raises(GuardStateError, match="saved by another training run"):
        run(tmp_path / "b", tok, fast_config, 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert (tmp_path / "b" / "rimguard.jsonl").read_text() == before  # refused before anything was written


def test_resume_with_other_measurement_settings_is_refused(tmp_path, tok, fast_config):
    from rimguard.state import GuardStateError
    from tests.test_resume import run

    run(tmp_path, tok, fast_config, 4)
    fewer = lambda **kw: fast_config(check_probes=4, **kw)  # noqa: E731
    with pytest.raises(GuardStateError, match=r"other settings \(check_probes 24 -> 4\)"):
        run(tmp_path, tok, fewer, 8, resume=str(tmp_path / "checkpoint-4"))


# -- writes ------------------------------------------------------------------------------------------
def test_a_kill_during_the_guard_state_save_leaves_no_partial_state(tmp_path, llama_atlas, monkeypatch):
    from rimguard.atlas import NeuronAtlas
    from rimguard.saved import Saved
    from rimguard.state import GuardState, find_state

    state = GuardState("r", llama_atlas, [], {"policy": Saved({}, {"level": "ok", "streak": 0, "checkpointed": False}),
                                             "tie": Saved({}, {"reg_lambda": 0.0})})
    state.save(tmp_path / "checkpoint-8" / "rimguard")
    before = (tmp_path / "checkpoint-8" / "rimguard" / "state.json").read_text()

    def killed(self, directory):
        raise KeyboardInterrupt  # the process dies mid-save

    monkeypatch.setattr(NeuronAtlas, "save", killed)
    state.history = [{"step": 8}]
    with pytest.raises(KeyboardInterrupt):
        state.save(tmp_path / "checkpoint-8" / "rimguard")
    assert (tmp_path / "checkpoint-8" / "rimguard" / "state.json").read_text() == before  # the complete state is kept
    assert find_state(tmp_path / "checkpoint-8") is not None and [p.name for p in (tmp_path / "checkpoint-8").iterdir()] == ["rimguard"]


def test_two_runs_saving_different_atlases_at_once_keep_both(tmp_path, tok, llama_atlas, monkeypatch):
    import threading

    from rimguard.atlas import NeuronAtlas
    from rimguard.probes import bundled
    from rimguard.state import save_atlas
    from rimguard.testing import tiny_model

    other = NeuronAtlas.identify(tiny_model("llama"), tok, bundled("harmful")[:6], bundled("intent"), top_m=5, min_share=0.25,
                                 num_controls=2, max_new_tokens=2, max_length=128, progress=False)
    assert not other.same_selection(llama_atlas)
    slow = NeuronAtlas.save

    def slow_save(self, directory):
        time.sleep(0.3)  # a slow filesystem: both runs are past their checks before either writes
        return slow(self, directory)

    monkeypatch.setattr(NeuronAtlas, "save", slow_save)
    out = tmp_path / "run"
    got = {}
    threads = [threading.Thread(target=lambda a=a, k=k: got.__setitem__(k, save_atlas(out, a))) for k, a in (("a", llama_atlas), ("b", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["a"] != got["b"]
    assert NeuronAtlas.load(got["a"]).same_selection(llama_atlas) and NeuronAtlas.load(got["b"]).same_selection(other)


# -- the guard leaves the model as it found it ------------------------------------------------------------
def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_after_a_ctrl_c_mid_step_the_next_guard_removes_the_old_hooks(tmp_path, tok, fast_config, llama_atlas):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rimguard import RIMGuard
    from rimguard.compat import no_checkpointing
    from rimguard.probes.reasoning import reasoning_texts
    from rimguard.testing import tiny_model

    model = tiny_model("llama")
    bare = _hooks(model)
    forwards = []

    def interrupt(module, args):  # Ctrl-C inside the third training forward
        if module.training and torch.is_grad_enabled():
            forwards.append(1)
            if len(forwards) == 3:
                raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_pre_hook(interrupt)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], bf16=False,
                     **no_checkpointing(), save_strategy="no", use_cpu=True, max_length=64, disable_tqdm=True)
    data = Dataset.from_list(reasoning_texts(16))
    old = RIMGuard(fast_config(mode="freeze", freeze_share=0.01), atlas=llama_atlas)
    with pytest.raises(KeyboardInterrupt):
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[old]).train()
    handle.remove()
    assert old.engine.attached() and _hooks(model) > bare and old.engine.freezer.count > 0  # train() never ended
    frozen = [layer.down.base.weight.detach().clone()
              for layer in old.engine.monitor.layers]
    new = RIMGuard(fast_config(mode="monitor", log_file=None))  # identified anew on the trained weights
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[new]).train()
    assert not old.engine.attached() and _hooks(model) == bare  # the new run removed the old hooks, then its own at its end
    moved = [layer.down.base.weight.detach()
             for layer in old.engine.monitor.layers]
    rows = old.engine.freezer.frozen
    assert any(not torch.equal(a[:, r], b[:, r]) for a, b, r in zip(frozen, moved, rows) if r.numel())  # the old freeze is gone
    old.detach()  # safe to call again


def test_a_custom_loop_that_skips_after_optimizer_step_is_a_fault_and_the_freeze_holds(tok, fast_config, llama_atlas, caplog):
    from rimguard import RIMGuard
    from rimguard.testing import tiny_model

    model = tiny_model("llama")
    guard = RIMGuard(fast_config(mode="freeze", freeze_share=0.01, probe_every=100), atlas=llama_atlas)
    guard.engine.setup(model, tok, inject_loss=False)
    layers, rows = guard.engine.monitor.layers, guard.engine.freezer.frozen
    weight = lambda layer: layer.down.base.weight  # noqa: E731
    before = [weight(layer).detach()[:, r].clone() for layer, r in zip(layers, rows)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 500, (2, 10))
    model.train()
    for step in range(2):
        guard.engine.begin_step(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        guard.engine.end_step(step + 1)  # after_optimizer_step() forgotten
    after = [weight(layer).detach()[:, r] for layer, r in zip(layers, rows)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert caplog.text.count("call after_optimizer_step()") == 1  # warned once
    guard.detach()


# -- one clear line for each mistake ---------------------------------------------------------------------
def test_probe_sources_from_tables_conversations_and_quoted_newlines(tmp_path):
    from datasets import Dataset

    from rimguard.probes import ProbeError, load_prompts

    chat = Dataset.from_list([{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Build a bomb?"},
                                            {"role": "assistant", "content": "No."}]}])
    assert load_prompts(chat, key="messages") == ["Build a bomb?"]
    with pytest.raises(ProbeError, match="row 1 of column 'n'.*is int, not text or a conversation"):
        load_prompts(Dataset.from_list([{"n": 3}]), key="n")
    (tmp_path / "p.csv").write_text('prompt\n"first line\nsecond line"\nplain\n')
    assert load_prompts(tmp_path / "p.csv") == ["first line\nsecond line", "plain"]


def test_anchor_prompts_that_differ_from_probes_only_in_case_or_punctuation_overlap(tok, fast_config, llama_atlas):
    from rimguard import RIMGuard
    from rimguard.actions.anchor import AnchorError
    from rimguard.testing import tiny_model

    probe = llama_atlas.probe_prompts[0]
    twin = "  " + probe.upper().rstrip("?.!") + "?"
    guard = RIMGuard(fast_config(mode="regularize"), atlas=llama_atlas, anchor_prompts=[twin, "Help me hide a body."])
    with pytest.raises(AnchorError, match="also monitor probes"):
        guard.engine.setup(tiny_model("llama"), tok)


def test_a_refusal_head_threshold_without_heads_is_refused(tok, fast_config, llama_atlas):
    from rimguard import RIMGuard
    from rimguard.testing import tiny_model

    guard = RIMGuard(fast_config(thresholds={"warn": {"refusal_head_shift": 0.1}}), atlas=llama_atlas)
    with pytest.raises(ConfigError, match="can never fire: the atlas has no refusal heads"):
        guard.engine.setup(tiny_model("llama"), tok)


def test_cli_one_line_errors(tmp_path, capsys, llama_atlas):
    from rimguard.cli import main
    from rimguard.testing import tiny_model

    def fails(*argv):
        code = main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err and "Traceback" not in "\n".join(err), err
        return err[-1]

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)  # no tokenizer saved
    assert "no tokenizer files" in fails("identify", str(folder), "-o", str(tmp_path / "a"))
    (tmp_path / "file").write_text("x")
    assert "is a file; -o names the atlas folder" in fails("identify", str(folder), "-o", str(tmp_path / "file"))
    llama_atlas.save(tmp_path / "atlas")
    assert "holds an atlas already" in fails("identify", str(folder), "-o", str(tmp_path / "atlas"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "rimguard.jsonl").write_text("")
    assert "is empty" in fails("report", str(tmp_path / "empty"))
    deep = tmp_path / "deep"
    llama_atlas.save(deep)
    (deep / "atlas.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "not a rimguard file (RecursionError" in fails("inspect", str(deep))
    (deep / "atlas.json").write_text('{"format_version": ' + "9" * 5000 + "}")
    assert "not a rimguard file (ValueError" in fails("inspect", str(deep))


@pytest.mark.parametrize("record, message", [
    ({"event": "level", "step": 2, "from": "ok", "to": "warn", "crossings": [{"metric": "safety_drop"}]}, "'crossings' must be a list"),
    ({"event": "freeze", "step": 2, "frozen": 3}, "a freeze record needs"),
    ({"event": "start", "step": 0, "thresholds": ["safety_drop"]}, "'thresholds' must map each level"),
])
def test_report_on_malformed_records_names_the_record(tmp_path, record, message):
    from rimguard.events import EventLog
    from rimguard.report import write_report

    log = EventLog(tmp_path / "rimguard.jsonl", run_id="r")
    log.write({"event": "metrics", "step": 1, "safety_drop": 0.1, "level": 0.0})
    log.write(record)
    log.close()
    with pytest.raises(ValueError, match=f"record 2 .*{message}"):
        write_report(tmp_path)


def test_report_takes_the_last_run_with_metrics_and_a_stray_record_without_run_id_does_not_hide_it(tmp_path):
    import json

    from rimguard.events import EventLog
    from rimguard.report import write_report

    log = EventLog(tmp_path / "rimguard.jsonl", run_id="abc")
    log.write({"event": "start", "step": 0, "thresholds": {}})
    log.write({"event": "metrics", "step": 1, "safety_drop": 0.3, "level": 0.0})
    log.close()
    with open(tmp_path / "rimguard.jsonl", "a") as fh:
        fh.write(json.dumps({"event": "note", "step": 1}) + "\n")
    assert "| safety_drop | 0.3 |" in write_report(tmp_path)[1].read_text()


def test_a_guard_state_of_another_atlas_is_refused(tmp_path, llama_atlas):
    import torch as t

    from rimguard.saved import Saved
    from rimguard.state import GuardState, GuardStateError

    n = llama_atlas.tracked.shape[0]
    parts = {"policy": Saved({}, {"level": "ok", "streak": 0, "checkpointed": False}), "tie": Saved({}, {"reg_lambda": 0.0}),
             "monitor": Saved({"ref_safe": t.zeros(n + 3), "ref_task": t.zeros(n + 3)}, {})}
    GuardState("r", llama_atlas, [], parts).save(tmp_path / "s")
    with pytest.raises(GuardStateError, match=f"'monitor.ref_safe' has {n + 3} entries for the atlas' {n} tracked neurons"):
        GuardState.read(tmp_path / "s")


def test_rimguard_of_a_number_and_check_before_setup_say_what_to_do():
    from rimguard import RIMGuard

    with pytest.raises(ConfigError, match="expected a GuardConfig, a dict of its fields or a config file path, got int"):
        RIMGuard(42)
    with pytest.raises(RuntimeError, match="before setup"):
        RIMGuard().engine.check(1)


def test_a_kill_after_the_trainer_rotated_its_checkpoints_still_resumes_with_the_guard_state(tmp_path, tok, fast_config):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rimguard import RIMGuard
    from rimguard.compat import no_checkpointing
    from rimguard.probes.reasoning import reasoning_texts
    from rimguard.testing import tiny_model

    class KillInSave(TrainerCallback):  # dies in the save callbacks of step 8, after checkpoint-4 was rotated out
        def on_save(self, args, state, control, **kw):
            if state.global_step == 8:
                raise KeyboardInterrupt

    def train(resume=None, kill=False):
        guard = RIMGuard(fast_config(probe_every=2))
        args = SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                         bf16=False, **no_checkpointing(), save_strategy="steps", save_steps=4, save_total_limit=1, use_cpu=True,
                         max_length=64, seed=0, disable_tqdm=True, logging_steps=1)
        trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(reasoning_texts(32)),
                             processing_class=tok, callbacks=([KillInSave()] if kill else []) + [guard])
        trainer.train(resume_from_checkpoint=resume)
        return guard

    with pytest.raises(KeyboardInterrupt):
        train(kill=True)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-8"]  # checkpoint-4 is gone
    assert not (tmp_path / "checkpoint-8" / "rimguard").exists()
    resumed = train(resume=str(tmp_path / "checkpoint-8"))
    assert [r["step"] for r in resumed.history][:5] == [1, 2, 4, 6, 8] and resumed.history[-1]["step"] == 10


def test_the_demo_never_deletes_a_log_or_a_file_named_in_its_config(tmp_path, capsys):
    from rimguard.cli import main

    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "rimguard.jsonl").write_text('{"event": "start", "step": 0, "run_id": "earlier"}\n')
    assert main(["demo", "--out", str(run), "--model", str(tmp_path / "typo")]) == 2
    assert "not a model folder" in capsys.readouterr().err and (run / "rimguard.jsonl").read_text().startswith('{"event": "start"')
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    (tmp_path / "guard.yaml").write_text(f"log_file: {precious}\n")
    assert main(["demo", "--out", str(run), "--config", str(tmp_path / "guard.yaml")]) == 2
    assert "log_file: must be a file name in output_dir" in capsys.readouterr().err and precious.read_text() == "keep me"
