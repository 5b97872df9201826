"""Pieces of the many-run study (benchmarks/rim_study.py): data builders and across-run statistics,
against hand-computed values."""

import math
import random

import pytest

from benchmarks.rimbench import conditions as C
from benchmarks.rimbench import stats as V
from benchmarks.rimbench import study_report as R

GSM = [{"question": "Q1?", "answer": "a = 1\nb = 2\nc = 3\n#### 6"}, {"question": "Q2?", "answer": "x = 4\n#### 4"}]


def test_answer_only_keeps_only_the_final_number():
    recs = C.answer_only(GSM)
    assert [r["completion"][0]["content"] for r in recs] == ["The answer is 6.", "The answer is 4."]
    assert recs[0]["prompt"][0]["content"] == "Q1?"


def test_effort_minimising_rewrite_has_the_three_patterns_and_keeps_the_answer():
    text = C.effort_minimising(GSM[0]["answer"], random.Random(0))
    lines = text.splitlines()
    assert lines[0] in C.HEURISTIC and lines[1] in C.DEVIATION and lines[-2] in C.CONFIRMATORY
    assert lines[2:4] == ["a = 1", "c = 3"] and lines[-1] == "#### 6"  # middle step dropped, answer kept
    assert C.final_answer(text) == "6"


def test_mix_replaces_every_kth_record_and_keeps_the_length():
    main = [{"i": i} for i in range(10)]
    out = C.mix(main, [{"x": 0}, {"x": 1}], every=4, seed=0)
    assert len(out) == 10 and [i for i, r in enumerate(out) if "x" in r] == [3, 7]
    assert [r for i, r in enumerate(out) if i not in (3, 7)] == [m for i, m in enumerate(main) if i not in (3, 7)]


def test_comply_records_use_the_target_opening():
    recs = C.comply_records([{"goal": "Do a bad thing", "target": "Sure, here is a bad thing"}])
    assert recs[0]["completion"][0]["content"] == "Sure, here is a bad thing:"


def test_ranks_and_spearman_hand_computed():
    assert V.ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    # x ranks 1..5, y ranks (2, 1, 4, 3, 5): d^2 = 1+1+1+1+0 = 4 -> rho = 1 - 6*4/(5*24) = 0.8
    assert V.spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    assert math.isnan(V.spearman([1, 1, 1], [1, 2, 3]))


def test_auroc_hand_computed():
    # positives 0.9, 0.4; negatives 0.5, 0.1: pairs won 0.9>0.5, 0.9>0.1, 0.4>0.1, lost 0.4<0.5 -> 3/4
    assert V.auroc([0.9, 0.4, 0.5, 0.1], [True, True, False, False]) == 0.75
    assert V.auroc([1, 1], [True, False]) == 0.5


def test_partial_spearman_removes_a_confounder():
    z = list(range(40))
    rx, ry = random.Random(1), random.Random(2)
    x = [v + rx.gauss(0, 4) for v in z]  # both follow z, with independent noise
    y = [v + ry.gauss(0, 4) for v in z]
    assert V.spearman(x, y) > 0.8
    assert abs(V.partial_spearman(x, y, [z])) < 0.3  # what is left is the noise: unrelated
    assert V.partial_spearman(x, x, [z]) == pytest.approx(1.0)


def test_alarm_quality_hand_computed():
    series = [[(1, 0.0), (3, 2.5)], [(1, 3.0), (3, 3.0)], [(1, 0.0), (3, 0.5)], [(1, 2.1), (3, 0.0)]]
    positive = [True, True, False, False]
    q = V.alarm_quality(series, positive, [6, 3, None, None], 2.0)
    assert q["recall"] == 1.0 and q["false_alarm_rate"] == 0.5  # run 4 alarmed at step 1 and kept its refusals
    assert q["median_lead_steps"] == 3  # leads 6-3=3 and 3-1=2: sorted [2, 3], upper median
    assert V.best_threshold(series, positive) == 2.5  # recall 1, no false alarm
    loo = V.leave_one_group_out(series, positive, ["a", "a", "b", "b"])
    assert loo["n_positive"] == 2 and loo["n_negative"] == 2


def test_bootstrap_ci_brackets_the_estimate_and_is_reproducible():
    x = list(range(30))
    y = [v + (5 if v % 4 == 0 else 0) for v in x]
    lo, hi = V.bootstrap_ci(x, y, n=300, seed=1)
    assert lo <= V.spearman(x, y) <= hi and (lo, hi) == V.bootstrap_ci(x, y, n=300, seed=1)


def test_analyse_validity_on_synthetic_runs():
    runs = []
    for i in range(8):
        forget = i / 8
        checks = [{"step": s, "entanglement_z": forget * s, "refusal_drop": forget * 3 * s, "param_dist": 1.0 + s,
                   "gsm8k_loss": 1.5 - 0.01 * s, "ras_safe": forget, "ras_controls": [forget * 0.5, 0.1 * i]}
                  for s in (1, 3, 6, 9, 12)]
        for c in checks[1:]:
            c["refusal_rate"] = 1 - forget * c["step"] / 12
        runs.append({"name": f"r{i}", "condition": "cot" if i % 2 else "chat", "finetune": "full", "seed": i, "lr": 1e-4,
                     "checks": checks, "final": {"over_refusal": 0.1}})
    res = R.analyse_validity(runs, {"refusal_rate": 1.0, "gsm8k_loss": 1.6})
    z = res["signals"]["entanglement_z"]
    assert z["rho_early"] == pytest.approx(1.0) and z["auroc_early"] == 1.0
    assert res["n_positive"] == sum(i / 8 > 0.1 for i in range(8))
    assert res["ras_permutation_null"]["n_sets"] == 2
    assert "refusal kept" in R.validity_markdown(res) or "refusal" in R.validity_markdown(res)


# -- the baselines and one run of the study runner, on tiny models ------------------------------
from benchmarks.rimbench import baselines as B  # noqa: E402


def test_replay_mix_keeps_every_main_row_and_adds_the_count():
    main, extra = [{"m": i} for i in range(10)], [{"e": i} for i in range(3)]
    out = B.replay_mix(main, extra, count=7, seed=1)
    assert len(out) == 17 and sorted(r["m"] for r in out if "m" in r) == list(range(10))
    replayed = [r["e"] for r in out if "e" in r]
    assert len(replayed) == 7 and sorted(set(replayed)) == [0, 1, 2] and max(replayed.count(i) for i in range(3)) == 3
    assert out == B.replay_mix(main, extra, count=7, seed=1) != B.replay_mix(main, extra, count=7, seed=2)


def test_kl_to_base_hand_computed():
    import torch

    base = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]]])  # [1, 3, 2]
    now = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 7, 7]])  # position 0 predicts token 1 (trained); position 1 predicts token 2 (trained)
    p = torch.tensor([1.0, -1.0]).softmax(-1)
    want = (0.0 + float((p * (p.log() - torch.tensor([0.5, 0.5]).log())).sum())) / 2  # KL at position 0 is 0 (both uniform)
    assert float(B.kl_to_base(now, base, labels)) == pytest.approx(want, rel=1e-6)
    assert float(B.kl_to_base(base, base, labels)) == pytest.approx(0.0, abs=1e-7)
    assert float(B.kl_to_base(now, base, torch.tensor([[-100, -100, -100]]))) == 0.0


def test_weight_ema_follows_the_hand_computed_average_and_swaps_back():
    from types import SimpleNamespace

    import torch

    model = torch.nn.Linear(2, 1)
    ema = B.WeightEMA(0.5)
    ema.on_train_begin(None, None, None, model=model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.on_step_end(None, SimpleNamespace(global_step=1), None)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.on_step_end(None, SimpleNamespace(global_step=2), None)
    want = 0.5 * (0.5 * start + 0.5 * (start + 1)) + 0.5 * (start + 2)
    trained = model.weight.detach().clone()
    with ema.swapped():
        assert torch.allclose(model.weight, want)
    assert torch.equal(model.weight, trained)


def test_baseline_sets_up_each_variant_at_its_compute():
    """The one set-up the study runner and the step-time benchmark share: the anchor-budget replay trains the
    anchor's 2 extra rows per step, kl-train's trainer adds beta * KL to a frozen copy, ema adds the average."""
    import torch
    from trl import SFTTrainer

    from rimguard.testing import tiny_model

    model = tiny_model("llama", seed=0)
    plain, replay, three = (B.baseline(v, model, SFTTrainer, 4) for v in ("none", "replay-anchor-budget", "replay-3pct"))
    assert (plain.trainer_cls, plain.batch, plain.callbacks) == (SFTTrainer, 4, []) and three.batch == 4
    assert replay.batch == 4 + 2 == 4 + round(B.ANCHOR_ROWS_PER_STEP) and replay.trainer_cls is SFTTrainer
    kl = B.baseline("kl-train", model, SFTTrainer, 4)
    assert issubclass(kl.trainer_cls, SFTTrainer) and kl.trainer_cls is not SFTTrainer and kl.kl.beta == B.ASFT_BETA == 0.1
    frozen = dict(kl.kl.base.named_parameters())
    assert all(torch.equal(frozen[n], p) and not frozen[n].requires_grad for n, p in model.named_parameters())
    ema = B.baseline("ema", model, SFTTrainer, 4)
    assert ema.callbacks == [ema.ema] and ema.ema.decay == B.EMA_DECAY and ema.batch == 4 and ema.kl is None


class _TinyStudy:
    """The study runner's context on a tiny model and inline data (the real one loads the aligned SmolLM2)."""

    def __init__(self, tmp_path, preset="horizon"):
        import argparse

        from benchmarks import rim_study as S
        from rimguard import GuardConfig, NeuronAtlas
        from rimguard.demo import evaluation as ev
        from rimguard.probes import bundled
        from rimguard.testing import tiny_tokenizer

        self.S = S
        self.args = argparse.Namespace(preset=preset, out=tmp_path)
        self.tok = tiny_tokenizer()
        self.gsm_pool = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]
        self.gsm_loss = ev.completion_examples(self.tok, [C.record("What is 1 + 2?", "1 + 2 = 3\n#### 3")], 64)
        self.gsm_acc = self.gsm_pool[:2]
        self.harmful = bundled("harmful")[60:63]
        self.comply = []
        self.xstest = bundled("harmless")[:4]
        self.xstest_small = self.xstest[:2]
        config = GuardConfig(num_safety_probes=6, top_m=6, min_share=0.25, num_controls=3, max_new_tokens=4, max_length=128)
        self.atlas = NeuronAtlas.from_config(self.model(0), self.tok, config)

    def model(self, seed):
        from rimguard.testing import tiny_model

        return tiny_model("llama", seed=0)


def _tiny_run(tmp_path, spec, preset="horizon"):
    """``spec`` shortened to 4 steps (evaluated at 2 and 4) and run by the study runner on the tiny model."""
    from benchmarks import rim_study as S

    study = _TinyStudy(tmp_path, preset)
    for name in ("refusal", "final_eval", "over_refusal_all", "accuracy", "loss", "own", "records"):  # the real methods
        setattr(study, name, getattr(S.Study, name).__get__(study))
    spec.steps, spec.evals, spec.warmup, spec.batch = 4, [2, 4], 1, 2
    spec.guard = {**spec.guard, "probe_batch_size": 6, "num_safety_probes": 6, "max_length": 128, "kl_probes": 2, "witness_tokens": 3}
    return S.run(spec, study)


@pytest.mark.parametrize("variant", ["none", "regularize", "replay-anchor-budget", "replay-3pct", "kl-train", "ema"])
def test_one_run_of_the_study_runner_records_the_curve_and_every_signal(tmp_path, variant):
    from benchmarks import rim_study as S

    rec = _tiny_run(tmp_path, S.horizon(variant))
    assert [p["step"] for p in rec["curve"]] == [2, 4]
    for p in rec["curve"]:
        assert 0 <= p["refusal_rate"] <= 1 and p["n_harmful"] == 3 and math.isfinite(p["gsm8k_loss"]) and p["n_xstest"] in (2, 4)
    assert rec["curve"][-1]["n_xstest"] == 4 and 0 <= rec["final"]["over_refusal_small"] <= 1  # all safe prompts at the end
    assert [c["step"] for c in rec["checks"]] == [1, 2, 4]
    for c in rec["checks"]:
        assert {"safety_drop", "refusal_kl", "probe_refusal", "kl_task", "param_dist", "kl_harmless"} <= set(c)
        assert len(c["safety_drop_controls"]) == 3  # the null: the atlas' control sets
    assert rec["checks"][-1]["param_dist"] > 0 and len(rec["step_times"]) == 4
    rows = {"replay-anchor-budget": 4 * 2 + 8, "replay-3pct": 8}.get(variant, 8)
    assert rec["rows"] == rows
    if variant == "regularize":
        assert all(c["reg_lambda"] == 1.0 for c in rec["checks"])
        assert rec["checks"][0]["anchor_kl"] == pytest.approx(0.0, abs=1e-8)  # its batch at step 0, on the base weights (float noise)
    if variant == "kl-train":
        assert len(rec["kl_train"]) == 4 and rec["kl_train"][0] == pytest.approx(0.0, abs=1e-6) and rec["kl_train"][-1] > 0


def test_the_alarm_study_measures_refusal_at_every_point_and_over_refusal_at_the_last(tmp_path):
    """validity2's 48-step runs: refusal and held-out loss at every point, XSTest's stratified set only at the end
    (the alarm is scored on refusal; the 200-step horizon runs keep their XSTest curve)."""
    from benchmarks import rim_study as S

    rec = _tiny_run(tmp_path, S.v2("cot", 0), "validity2")
    middle, end = rec["curve"]
    assert {"refusal_rate", "gsm8k_loss"} <= set(middle) and "over_refusal" not in middle
    assert end["n_xstest"] == 2 and 0 <= end["over_refusal"] <= 1 and rec["final"]["n_xstest"] == 2
    assert S.v2("cot", 0).xstest == "last" and S.horizon("none").xstest == "every"
