"""Pieces of the many-run study (benchmarks/rim_study.py): data builders and across-run statistics,
against hand-computed values."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from rimbench import conditions as C  # noqa: E402
from rimbench import study_report as R  # noqa: E402
from rimbench import validity as V  # noqa: E402

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
