import json

import pytest
import torch

from rimguard import AtlasError, NeuronAtlas, ProbeError, load_prompts
from rimguard.probes import BUNDLED, bundled
from rimguard.testing import tiny_model


def test_bundled_sets_are_large_enough():
    for name in ("harmful", "intent", "harmless", "reasoning"):
        assert len(bundled(name)) >= 64, name
    for name in BUNDLED:
        items = bundled(name)
        assert len(set(items)) == len(items)


def test_identify_structure(llama_atlas):
    atlas = llama_atlas
    n = atlas.num_safety
    assert n > 0 and atlas.controls.shape == (8, n)
    safety = atlas.safety_neurons()
    assert ((safety[:, 1] >= 0) & (safety[:, 1] < 128)).all()
    # controls are matched per layer and disjoint from the safety set
    safe_set = {tuple(r) for r in safety.tolist()}
    for row in atlas.controls:
        ctrl = atlas.tracked[row]
        assert torch.equal(torch.bincount(ctrl[:, 0], minlength=2), torch.bincount(safety[:, 0], minlength=2))
        assert not safe_set & {tuple(r) for r in ctrl.tolist()}
    assert (atlas.score >= 0.25).all() and (atlas.score[:-1] >= atlas.score[1:]).all()
    assert len(atlas.probe_prompts) == len(atlas.probe_responses) == 12


def test_counterfactual_selection_matches_manual_topm(tok, monkeypatch):
    """The selected set is exactly the neurons in the top-m of >= q of the pairs, computed by hand."""
    import rimguard.atlas.core as atlas_mod

    acts = torch.randn(8, 256)  # 4 harmful rows, then 4 contrast rows
    acts[4:, 7] += 10.0  # neuron 7 is top in every pair
    monkeypatch.setattr(atlas_mod, "generate", lambda m, t, prompts, *a, **k: [""] * len(prompts))
    parts = iter([acts[:4], acts[4:]])  # the harmful side, then the contrast side
    monkeypatch.setattr(atlas_mod, "activations", lambda *a, **k: next(parts))
    atlas = NeuronAtlas.identify(tiny_model("llama"), tok, ["a", "b", "c", "d"], ["x"], top_m=5, min_share=0.5,
                                 num_controls=3, progress=False)
    diff = acts[4:] - acts[:4]
    counts = torch.zeros(256)
    for row in diff:
        counts[row.topk(5).indices] += 1
    expected = set((counts / 4 >= 0.5).nonzero().squeeze(1).tolist())
    flat = atlas.safety_neurons()
    got = set((flat[:, 0] * 128 + flat[:, 1]).tolist())
    assert got == expected and 7 in got


def test_effect_size_method(tok):
    model = tiny_model("llama")
    atlas = NeuronAtlas.identify(model, tok, bundled("harmful")[:6], harmless=bundled("harmless")[:6], method="effect_size",
                                 top_m=5, num_controls=4, max_new_tokens=4, progress=False)
    assert atlas.num_safety == 5 and atlas.settings["method"] == "effect_size"


def test_effect_size_needs_two_prompts_per_side(tok):
    with pytest.raises(AtlasError, match="at least 2 prompts per side"):
        NeuronAtlas.identify(tiny_model("llama"), tok, bundled("harmful")[:1], harmless=bundled("harmless")[:6],
                             method="effect_size", top_m=5, num_controls=4, max_new_tokens=4, progress=False)


def test_activation_moments_equal_the_full_matrix_statistics(tok):
    from rimguard.atlas.core import activation_moments
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.passes import activations, pad_id, tokenize_dialogues

    model = tiny_model("llama")
    layers = find_mlp_layers(model)
    capture = ActivationCapture(model, layers, [None] * len(layers)).attach()
    prompts = bundled("harmless")[:11]
    seqs = tokenize_dialogues(tok, prompts, ["Sure, here it is."] * len(prompts), 64)
    full = activations(model, capture, seqs, pad_id(tok), batch_size=4, full=True).double()
    moments = activation_moments(model, capture, seqs, pad_id(tok), batch_size=4, full=True)
    capture.remove()
    assert moments.count == 11
    torch.testing.assert_close(moments.mean.double(), full.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moments.var.double(), full.var(0), rtol=1e-3, atol=1e-6)


def test_identification_memory_does_not_grow_with_harmless_prompts(tok, monkeypatch):
    """Only the (config-capped) harmful probes are held as a [prompts x neurons] matrix; the harmless
    set streams batch by batch, so 40 of them never form one 40-row matrix."""
    import rimguard.atlas.core as atlas_module
    import rimguard.passes as probing_module

    rows = []
    real = probing_module.activations

    def counting(model, capture, sequences, *args, **kwargs):
        rows.append(len(sequences))
        return real(model, capture, sequences, *args, **kwargs)

    monkeypatch.setattr(probing_module, "activations", counting)
    monkeypatch.setattr(atlas_module, "activations", counting)
    NeuronAtlas.identify(tiny_model("llama"), tok, bundled("harmful")[:4], harmless=bundled("harmless")[:40], method="effect_size",
                         top_m=5, num_controls=4, max_new_tokens=2, batch_size=4,
                         max_length=128, progress=False)
    assert rows and max(rows) <= 4


def test_strict_intersection_can_fail_with_clear_error(tok):
    with pytest.raises(AtlasError, match="lower min_share"):
        NeuronAtlas.identify(tiny_model("llama"), tok, bundled("harmful")[:8], bundled("intent"), top_m=1, min_share=1.0,
                             num_controls=2, max_new_tokens=4, progress=False)


def test_save_load_roundtrip_and_wrong_model(tmp_path, llama_atlas):
    llama_atlas.save(tmp_path / "a")
    loaded = NeuronAtlas.load(tmp_path / "a")
    for name in ("tracked", "safety", "controls", "score", "ranking"):
        assert torch.equal(getattr(loaded, name), getattr(llama_atlas, name))
    assert loaded.probe_responses == llama_atlas.probe_responses and loaded.settings == llama_atlas.settings
    loaded.check_model(tiny_model("llama"))  # same seed, same weights
    with pytest.raises(AtlasError, match="other weights of the same architecture"):
        loaded.check_model(tiny_model("llama", seed=1))
    with pytest.raises(AtlasError, match="model_class"):
        loaded.check_model(tiny_model("qwen2"))
    with pytest.raises(AtlasError, match="layer_sizes"):
        loaded.check_model(tiny_model("llama", intermediate=96))
    assert "safety-critical" in loaded.summary()


def test_load_errors(tmp_path):
    with pytest.raises(AtlasError, match="not an atlas folder"):
        NeuronAtlas.load(tmp_path)


def test_a_format_1_atlas_still_loads_and_an_unknown_format_is_named(tmp_path, llama_atlas):
    """Format 1 also held base references (ref_safe, ref_task) that nothing read; format 2 dropped them."""
    from safetensors.torch import load_file, save_file

    from rimguard.schema import file_sha256

    folder = llama_atlas.save(tmp_path / "v1")
    tensors = load_file(str(folder / "atlas.safetensors"))
    n = tensors["tracked"].shape[0]
    save_file({**tensors, "ref_safe": torch.ones(n), "ref_task": torch.full((n,), float("nan"))}, str(folder / "atlas.safetensors"))
    meta = json.loads((folder / "atlas.json").read_text())
    meta.update(format_version=1, extra={}, tensors_sha256=file_sha256(folder / "atlas.safetensors"))
    (folder / "atlas.json").write_text(json.dumps(meta))
    assert NeuronAtlas.load(folder).same_selection(llama_atlas)
    meta["format_version"] = 7
    (folder / "atlas.json").write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="atlas format 7"):
        NeuronAtlas.load(folder)


def test_prompt_loaders(tmp_path):
    (tmp_path / "p.csv").write_text("goal,target\nhow to x,sure\nhow to y,sure\n")
    assert load_prompts(tmp_path / "p.csv") == ["how to x", "how to y"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["one", "two"]
    assert load_prompts(["q", " r "]) == ["q", "r"]
    from datasets import Dataset

    assert load_prompts(Dataset.from_dict({"text": ["d1", "d2"]})) == ["d1", "d2"]
    assert load_prompts("bundled:harmful") == bundled("harmful")


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "line 2 is not valid JSON"),
    ("nohdr.csv", "", "no header"),
    ("cols.csv", "a,b\n1,2\n", "cannot tell which column"),
    ("p.xml", "<x/>", "unsupported probe file type"),
])
def test_prompt_loader_errors_name_file_and_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProbeError, match=message) as err:
        load_prompts(path)
    assert name in str(err.value)
    with pytest.raises(ProbeError, match="no such probe file"):
        load_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("name", ["bom.csv", "bom.jsonl", "bom.txt"])
def test_prompt_files_with_a_utf8_bom_load(tmp_path, name):
    body = {"bom.csv": "goal,target\nhow to x,sure\n", "bom.jsonl": '{"prompt": "how to x"}\n', "bom.txt": "how to x\n"}[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_prompts(tmp_path / name) == ["how to x"]


@pytest.mark.parametrize("name, blob", [("latin1.txt", "caf\xe9 au lait\n".encode("latin-1")),
                                        ("binary.jsonl", bytes(range(256)))])
def test_prompt_files_that_are_not_utf8_name_the_file(tmp_path, name, blob):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(ProbeError, match="not UTF-8 text") as err:
        load_prompts(tmp_path / name)
    assert name in str(err.value)


def test_prompt_key_reaches_the_guard_and_the_cli(tmp_path, tok, fast_config):
    import subprocess
    import sys

    from rimguard import RIMGuard

    rows = "\n".join(json.dumps({"behavior": p, "id": i}) for i, p in enumerate(bundled("harmful")[:12]))
    (tmp_path / "harm.jsonl").write_text(rows + "\n")
    with pytest.raises(ProbeError, match="prompt_key"):
        guard = RIMGuard(fast_config(), safety_prompts=tmp_path / "harm.jsonl")
        NeuronAtlas.from_config(tiny_model("llama"), tok, guard.config, guard.engine.sources)
    guard = RIMGuard(fast_config(), safety_prompts=tmp_path / "harm.jsonl", prompt_key="behavior", tokenizer=tok)
    atlas = NeuronAtlas.from_config(tiny_model("llama"), tok, guard.config, guard.engine.sources)
    assert atlas.probe_prompts == bundled("harmful")[:12]
    proc = subprocess.run([sys.executable, "-m", "rimguard.cli", "identify", str(tmp_path / "nomodel"), "--safety",
                           str(tmp_path / "harm.jsonl"), "--key", "behavior", "-o", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such model folder" in proc.stderr  # --key is accepted by the parser
