"""Saved atlases and guard states are checked on load: any defect is one clear error naming the file and
the field (never a raw SafetensorError, JSONDecodeError or KeyError, never a silent wrong value)."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from rimguard import AtlasError, NeuronAtlas, RIMGuard
from rimguard.schema import file_sha256
from rimguard.state import GuardState, GuardStateError
from rimguard.testing import tiny_model


def _rewrite(folder, stem, meta=None, tensors=None):
    """Edit a saved folder's JSON and/or tensors, keeping its checksum consistent (so that the field
    checks, not the checksum, are what a test exercises)."""
    meta_path, tensor_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    data = json.loads(meta_path.read_text())
    if tensors is not None:
        t = load_file(str(tensor_path))
        tensors(t)
        save_file(t, str(tensor_path))
    if meta is not None:
        meta(data)
    data["tensors_sha256"] = file_sha256(tensor_path)
    meta_path.write_text(json.dumps(data))


ATLAS_DEFECTS = {
    "prompts as a string": (lambda m: m.update(probe_prompts="how do I"), None, "'probe_prompts' must be a list"),
    "no prompts": (lambda m: m.update(probe_prompts=[], probe_responses=[]), None, "'probe_prompts' is empty"),
    "fewer responses": (lambda m: m.update(probe_responses=m["probe_responses"][:-1]), None, "'probe_responses' has"),
    "int prompts": (lambda m: m.update(probe_prompts=[1, 2]), None, "list of strings"),
    "settings missing": (lambda m: m.pop("settings"), None, "'settings' is missing"),
    "bad layer sizes": (lambda m: m["fingerprint"].update(layer_sizes=[128, "x"]), None, "layer_sizes"),
    "safety out of range": (None, lambda t: t["safety"].__setitem__(0, 10_000), "'safety' holds index 10000"),
    "neuron beyond its layer": (None, lambda t: t["tracked"].__setitem__((0, 1), 128), "'tracked (neuron)' holds index 128"),
    "negative control": (None, lambda t: t["controls"].__setitem__((0, 0), -1), "'controls' holds index -1"),
    "integer scores": (None, lambda t: t.update(score=t["score"].long()), "'score' must be floating point"),
    "short scores": (None, lambda t: t.update(score=t["score"][:-1]), "'score' must have shape"),
    "no tracked": (None, lambda t: t.pop("tracked"), "'tracked' is missing"),
}


@pytest.mark.parametrize("case", sorted(ATLAS_DEFECTS))
def test_atlas_field_defects_are_atlas_errors_naming_file_and_field(tmp_path, llama_atlas, case):
    meta, tensors, message = ATLAS_DEFECTS[case]
    folder = llama_atlas.save(tmp_path / "atlas")
    _rewrite(folder, "atlas", meta, tensors)
    with pytest.raises(AtlasError, match=re.escape(message)) as err:
        NeuronAtlas.load(folder)
    assert str(folder) in str(err.value)


def test_atlas_corrupt_bytes_are_atlas_errors(tmp_path, llama_atlas):
    folder = llama_atlas.save(tmp_path / "atlas")
    blob = (folder / "atlas.safetensors").read_bytes()
    # tensor bytes overwritten in place: the file still parses, only the checksum can tell
    (folder / "atlas.safetensors").write_bytes(blob[:-8] + bytes(8))
    with pytest.raises(AtlasError, match="checksum mismatch"):
        NeuronAtlas.load(folder)
    # truncated tensors (with the checksum removed, the reader must still fail cleanly)
    meta = json.loads((folder / "atlas.json").read_text())
    meta.pop("tensors_sha256")
    (folder / "atlas.json").write_text(json.dumps(meta))
    (folder / "atlas.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AtlasError, match="unreadable tensor file"):
        NeuronAtlas.load(folder)
    (folder / "atlas.json").write_text('{"format_version": 1, "fingerpr')
    with pytest.raises(AtlasError, match="truncated or corrupt"):
        NeuronAtlas.load(folder)


def test_cli_inspect_on_a_corrupt_atlas_is_one_line_exit_2(tmp_path, llama_atlas):
    folder = llama_atlas.save(tmp_path / "atlas")
    _rewrite(folder, "atlas", tensors=lambda t: t["safety"].__setitem__(0, 10_000))
    proc = subprocess.run([sys.executable, "-m", "rimguard.cli", "inspect", str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "'safety' holds index 10000" in proc.stderr


def test_fingerprint_survives_a_dtype_cast_but_not_other_weights(llama_atlas):
    for dtype in (torch.bfloat16, torch.float16):
        llama_atlas.check_model(tiny_model("llama").to(dtype))  # the same model in reduced precision
    with pytest.raises(AtlasError, match="other weights of the same architecture"):
        llama_atlas.check_model(tiny_model("llama", seed=1).to(torch.bfloat16))


@pytest.fixture()
def saved_state(tmp_path, tok, fast_config, llama_atlas):
    guard = RIMGuard(fast_config(mode="freeze"), atlas=llama_atlas)
    guard.engine.setup(tiny_model("llama"), tok, output_dir=tmp_path, inject_loss=False)
    guard.engine.freezer.freeze(llama_atlas.safety_per_layer())
    folder = tmp_path / "checkpoint-4" / "rimguard"
    guard.engine.state().save(folder)
    guard.engine.teardown()
    return folder


STATE_DEFECTS = {
    "unknown level": (lambda m: m["parts"]["policy"].update(level="panic"), "'parts.policy' must hold a level"),
    "frozen id beyond the layer": (lambda m: m["parts"]["freezer"]["frozen"][0].append(500), "'frozen' must hold one list"),
    "frozen for too few layers": (lambda m: m["parts"]["freezer"]["frozen"].pop(), "'frozen' must hold one list"),
    "lambda as text": (lambda m: m["parts"]["tie"].update(reg_lambda="0.5"), "'reg_lambda' must be a number"),
    "negative lambda": (lambda m: m["parts"]["tie"].update(reg_lambda=-1.0), "'reg_lambda' must be >= 0"),
    "history without steps": (lambda m: m.update(history=[{"level": 0}]), "'history' must be a list of records"),
    "checkpointed missing": (lambda m: m["parts"]["policy"].pop("checkpointed"), "'checkpointed' is missing"),
    "checkpointed as text": (lambda m: m["parts"]["policy"].update(checkpointed="no"), "'checkpointed' must be a boolean"),
    "no parts": (lambda m: m.pop("parts"), "'parts' is missing"),
    "part not an object": (lambda m: m["parts"].update(monitor=[1]), "'parts.monitor' must be an object"),
}


def test_a_saved_state_reads_back(saved_state, llama_atlas):
    state = GuardState.read(saved_state)
    assert state.atlas.same_selection(llama_atlas)
    assert [sorted(f) for f in state.parts["freezer"].meta["frozen"]] == [sorted(s.tolist()) for s in llama_atlas.safety_per_layer()]


@pytest.mark.parametrize("case", sorted(STATE_DEFECTS))
def test_guard_state_defects_are_guard_state_errors(saved_state, case):
    edit, message = STATE_DEFECTS[case]
    _rewrite(saved_state, "state", meta=edit)
    with pytest.raises(GuardStateError, match=re.escape(message)) as err:
        GuardState.read(saved_state)
    assert str(saved_state) in str(err.value)


def test_guard_state_corrupt_files(saved_state):
    blob = (saved_state / "state.safetensors").read_bytes()
    (saved_state / "state.safetensors").write_bytes(blob[:-4] + b"\x7f\x7f\x7f\x7f")
    with pytest.raises(GuardStateError, match="checksum mismatch"):
        GuardState.read(saved_state)
    (saved_state / "state.json").write_text("{not json")
    with pytest.raises(GuardStateError, match="truncated or corrupt"):
        GuardState.read(saved_state)


def test_the_docs_call_only_engine_methods_that_exist():
    """Every ``engine.NAME(`` in the README, the guide and the engine's own docstring is a GuardEngine method, so a
    custom loop copied from the docs runs."""
    from pathlib import Path

    from rimguard import GuardEngine, engine

    root = Path(__file__).resolve().parent.parent
    texts = [(root / "README.md").read_text(), (root / "docs" / "guide.md").read_text(), engine.__doc__]
    called = {name for text in texts for name in re.findall(r"\bengine\.(\w+)\(", text)}
    assert {"setup", "begin_step", "reg_loss", "before_optimizer_step", "end_step", "finish"} <= called
    assert not [name for name in called if not callable(getattr(GuardEngine, name, None))]
