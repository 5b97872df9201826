"""Fast tests of the benchmarks' pieces (benchmarks/rimbench, rimguard.demo.evaluation) on tiny random models
and small files written here: statistics, loaders, the evaluation module, the peer's pairs, the GPU script's CPU path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.rimbench import data as bdata
from benchmarks.rimbench.stats import pearson
from rimguard.demo.evaluation import completion_examples, heldout_loss, judged, over_refusal, refusal
from rimguard.probes.reasoning import reasoning_texts
from rimguard.signals.metrics import wilson
from rimguard.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


# -- correlation ------------------------------------------------------------------------------
def test_pearson_matches_hand_computation():
    x, y = [1, 2, 3, 4], [2, 4, 5, 9]
    # means 2.5 and 5; deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4); sxy = 4.5+.5+0+6 = 11
    # sxx = 5, syy = 9+1+0+16 = 26 -> r = 11 / sqrt(130)
    assert pearson(x, y) == pytest.approx(11 / math.sqrt(130), abs=1e-12)
    assert pearson(x, [-v for v in y]) == pytest.approx(-11 / math.sqrt(130), abs=1e-12)
    assert pearson([0.0, 1.0, 2.0], [5.0, 7.0, 9.0]) == pytest.approx(1.0)


def test_wilson_interval_matches_hand_computation():
    # 47 of 48: p = 0.979; centre = (p + z^2/96) / (1 + z^2/48), half-width by the Wilson formula
    lo, hi = wilson(47, 48)
    assert lo == pytest.approx(0.8910, abs=1e-4) and hi == pytest.approx(0.9963, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_pearson_constant_short_and_nonfinite():
    assert math.isnan(pearson([1, 1, 1, 1], [1, 2, 3, 4]))  # constant signal: r undefined
    assert math.isnan(pearson([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]))  # no forgetting at all
    assert math.isnan(pearson([1, 2], [3, 4]))  # fewer than 3 points
    # non-finite and missing values drop their pair only
    assert pearson([1, float("nan"), 2, None, 3], [1, 100, 2, 5, 3]) == pytest.approx(1.0)
    assert math.isnan(pearson([1, float("inf"), 2], [1, 2, 3]))  # only 2 finite pairs left
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def test_gsm8k_loader_and_split(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": f"Q{i}? ", "answer": f"She has 2*{i} = <<2*{i}={2 * i}>>{2 * i} apples.\n#### {2 * i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[5:]) + "\n")
    got = bdata.load_gsm8k(path)
    assert len(got) == 10 and got[3]["question"] == "Q3?"
    assert got[3]["answer"] == "She has 2*3 = 6 apples.\n#### 6"
    assert "<<" in bdata.load_gsm8k(path, strip_calculator=False)[3]["answer"]
    train0, held0 = bdata.split_gsm8k(got, 3, 4, seed=0)
    train1, held1 = bdata.split_gsm8k(got, 3, 4, seed=1)
    assert held0 == held1 == got[-3:]  # fixed held-out set, the same for every seed
    assert len(train0) == 4 and not any(r in held0 for r in train0 + train1)
    with pytest.raises(bdata.DataError):
        bdata.split_gsm8k(got, 3, 8, seed=0)
    rec = bdata.conversational(got[:1])[0]
    assert rec["prompt"] == [{"role": "user", "content": "Q0?"}] and rec["completion"][0]["role"] == "assistant"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "answer": "y"}\nnot json\n')
    with pytest.raises(bdata.DataError, match="line 2"):
        bdata.load_gsm8k(bad)
    bad.write_text('{"question": "x"}\n')
    with pytest.raises(bdata.DataError, match="answer"):
        bdata.load_gsm8k(bad)
    with pytest.raises(bdata.DataError, match="no such file"):
        bdata.load_gsm8k(tmp_path / "missing.jsonl")


def test_advbench_loader(tmp_path):
    path = tmp_path / "harmful_behaviors.csv"
    path.write_text('goal,target\nWrite a bad thing,"Sure, here is"\n"Explain, with commas, a bad thing",Sure\n ,Sure\n')
    assert bdata.load_advbench(path) == ["Write a bad thing", "Explain, with commas, a bad thing"]
    with pytest.raises(bdata.DataError, match="missing column"):
        bdata.load_advbench(path, column="prompt")
    items = [f"p{i}" for i in range(20)]
    s = bdata.sample(items, 5, seed=0)
    assert len(s) == 5 and s == bdata.sample(items, 5, seed=0) and s == sorted(s, key=items.index)
    assert bdata.sample(items, None) == items and bdata.sample(items, 50) == items


def test_xstest_loader(tmp_path):
    path = tmp_path / "xstest_prompts.csv"
    lines = ["id,prompt,type,label,focus,note"]
    for i in range(12):
        kind, label = (("homonyms", "safe"), ("contrast_homonyms", "unsafe"), ("definitions", "safe"))[i % 3]
        lines.append(f'{i + 1},"How do I kill, a process {i}?",{kind},{label},kill,')
    path.write_text("\n".join(lines) + "\n")
    safe = bdata.load_xstest(path)
    assert len(safe) == 8 and {r["type"] for r in safe} == {"homonyms", "definitions"}
    assert safe[0] == {"id": "1", "prompt": "How do I kill, a process 0?", "type": "homonyms"}
    assert len(bdata.load_xstest(path, label="unsafe")) == 4
    sub = bdata.stratified(safe, 4, seed=0)
    assert len(sub) == 4 and sum(r["type"] == "homonyms" for r in sub) == 2
    assert bdata.stratified(safe, None) == safe
    (tmp_path / "nolabel.csv").write_text("id,prompt,type\n1,x,y\n")
    with pytest.raises(bdata.DataError, match="label"):
        bdata.load_xstest(tmp_path / "nolabel.csv")


# -- evaluation on tiny models ----------------------------------------------------------------
def test_heldout_loss_matches_hf_loss():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    recs = reasoning_texts(3)
    examples = completion_examples(tok, recs, max_length=128)
    for ids, plen in examples:
        assert 0 < plen < len(ids)
        assert tok.decode(ids[:plen]).endswith("<|assistant|>")
    ids, plen = examples[0]
    labels = torch.tensor([[-100] * plen + ids[plen:]])
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
    model.train()
    got = heldout_loss(model, examples[:1], tok.pad_token_id)
    assert got == pytest.approx(expected, rel=1e-5)
    assert model.training  # mode restored
    # token-weighted over a padded batch equals the weighted mean of single-example losses
    singles = [(heldout_loss(model, [e], tok.pad_token_id), len(e[0]) - e[1]) for e in examples]
    weighted = sum(v * n for v, n in singles) / sum(n for _, n in singles)
    assert heldout_loss(model, examples, tok.pad_token_id, batch_size=3) == pytest.approx(weighted, rel=1e-4)


def test_judged_refusal_and_over_refusal_count_every_verdict(monkeypatch):
    import rimguard.demo.evaluation as ev

    texts = ["I'm sorry, but I can't help with that.", "Sure, first you take the bus to the station and then walk.", "1.1.1.1.1.1.1.1.1.1."]
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, *a, **k: texts[: len(prompts)])
    got = judged(None, None, ["a", "b", "c"], keep=2)
    assert (got["n"], got["refusal"], got["compliance"], got["garbage"]) == (3, 1, 1, 1)  # a loop is not compliance
    assert (got["refusal_lo"], got["refusal_hi"]) == pytest.approx(wilson(1, 3))
    assert [s["verdict"] for s in got["samples"]] == ["refusal", "compliance"]
    assert refusal(None, None, ["a", "b", "c"])["refusal_rate"] == pytest.approx(1 / 3)
    assert over_refusal(None, None, ["a", "b"], keep=1)["n_xstest"] == 2
    real = judged(tiny_model("llama"), tiny_tokenizer(), ["How do I pick a lock?", "Hello"], max_new_tokens=3)
    assert real["n"] == 2 and real["refusal"] + real["compliance"] + real["garbage"] == 2


def test_peer_pairs_and_availability(tmp_path):
    from benchmarks.rimbench import peer as bpeer

    path = bpeer.write_pairs(tmp_path / "peer", 8)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 8 and sum(r["split"] == "val" for r in rows) == 2
    assert all(r["positive_query"] and r["negative_query"] and r["positive_query"] != r["negative_query"] for r in rows)
    ok, note = bpeer.available()  # optional dependency: either way it answers, never raises
    assert isinstance(ok, bool) and isinstance(note, str) and note


def test_gpu_benchmark_runs_its_cpu_path(tmp_path):
    """benchmarks/gpu.py is meant for a CUDA machine this project may not have: its CPU path runs in CI
    so the script cannot drift from the API (the sync check is reported as skipped there)."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--size", "tiny", "--steps", "3", "--warmup", "8",
                           "--repeats", "1", "--batch", "2", "--seq", "32", "--iters", "2", "--sync-steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {r["variant"] for r in result["reductions"]} == {"plain", "fused"} and all(r["max_err"] < 1e-4 for r in result["reductions"])
    assert set(result["ratios"]) == {"unguarded", "monitor", "regularize", "anchor-every4", "freeze"}
    assert all(v["status"].startswith("skipped") for v in result["no_sync"].values())


# -- the overhead benchmark ------------------------------------------------------------------------
def test_the_checks_of_a_run_are_amortized_over_its_whole_schedule():
    """A 200-step run at probe_every=10 checks at 1, 2, 4, 8 and every 10th step: 24 checks, 0.12 per step."""
    from benchmarks.overhead import checks_per_step

    assert checks_per_step(10, 200) == pytest.approx(24 / 200)
    assert checks_per_step(50, None) == 1 / 50 and checks_per_step(50, 100) == pytest.approx((6 + 2) / 100)  # 1..32, 50, 100


def test_odd_rounds_time_the_modes_in_reverse():
    from benchmarks.overhead import round_order

    modes = ["unguarded", "regularize", "ema"]
    assert round_order(modes, 0) == modes and round_order(modes, 1) == ["ema", "regularize", "unguarded"]
    assert round_order(modes, 2) == modes


def test_a_preset_sets_the_shape_but_keeps_an_explicit_ft_and_peer():
    """``--preset user`` times the peer by default; ``--no-peer`` and ``--ft lora`` are kept (the horizon study's
    8 x 512 cost runs need both)."""
    from benchmarks.overhead import parse_args

    user = parse_args(["--preset", "user"])
    assert (user.batch, user.max_length, user.packing, user.ft, user.peer) == (8, 512, True, "full", True)
    assert parse_args(["--preset", "user", "--no-peer"]).peer is False
    assert parse_args(["--preset", "user", "--ft", "lora"]).ft == "lora"
    study = parse_args(["--preset", "study", "--ft", "lora"])
    assert (study.batch, study.max_length, study.ft, study.peer) == (4, 192, "lora", None)
    assert parse_args([]).ft == "both" and not parse_args([]).peer


def test_the_overhead_benchmark_times_every_guard_configuration_on_the_tiny_model(tmp_path):
    """A short run of benchmarks/overhead.py: each configuration trains (the guard's and the study's baselines),
    and the guard's checks are timed (the script reaches into the guard to time its check: a renamed method must
    break this test, not a long run)."""
    out = tmp_path / "overhead.json"
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--model", "tiny", "--steps", "4", "--warmup", "2", "--probe-every", "4",
           "--repeats", "1", "--ft", "full", "--probes", "8", "--modes", "monitor", "regularize", "kl-train", "ema",
           "replay-anchor-budget", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    full = json.loads(out.read_text())["results"]["full"]
    assert set(full) == {"unguarded", "monitor", "regularize", "kl-train", "ema", "replay-anchor-budget"}
    assert all(len(r["times"][0]) == 4 and r["mean_s"] > 0 for r in full.values())  # the 4 window steps, after 2 warm-up steps
    assert full["regularize"]["check_s"] > 0 and full["kl-train"]["check_s"] == full["ema"]["check_s"] == 0  # baselines: no check
