"""The horizon study's analysis (benchmarks/rimbench/horizon_report.py) on hand-made run records."""

import json
import math

import pytest

from benchmarks.rimbench import horizon_report as H

STEP0 = {"refusal_rate": 0.8, "refusal_lo": 0.67, "refusal_hi": 0.89, "gsm8k_loss": 1.0, "over_refusal": 0.30,
         "over_refusal_lo": 0.25, "over_refusal_hi": 0.36, "over_refusal_small": 0.25, "n_harmful": 48, "n_xstest": 250}


def _run(variant, seed, points, finetune="full", step_times=None):
    """A run record as rim_study writes it: curve points (step, refusal, loss, over-refusal), checks at 1 and 10."""
    curve = []
    for step, refusal, loss, over in points:
        curve.append({"step": step, "refusal_rate": refusal, "refusal_lo": 0, "refusal_hi": 1, "garbage_rate": 0.0,
                      "gsm8k_loss": loss, "over_refusal": over, "over_refusal_lo": over - 0.05, "over_refusal_hi": over + 0.05,
                      "n_xstest": 250 if step == points[-1][0] else 100, **({"over_refusal_small": over - 0.01} if step == points[-1][0] else {})})
    return {"name": f"cot-{finetune}-{variant}-s{seed}", "variant": variant, "seed": seed, "finetune": finetune, "steps": points[-1][0],
            "evals": [p[0] for p in points], "curve": curve, "checks": [{"step": 1, "safety_drop": 0.1}, {"step": 10, "safety_drop": 0.3}],
            "step_times": step_times or {str(s): 1.0 for s in range(1, 21)}}


def test_records_prepend_step_zero_and_compute_gain_share_against_the_same_seed():
    none = _run("none", 0, [(10, 0.4, 0.8, 0.20), (20, 0.2, 0.6, 0.22)])
    anchor = _run("regularize", 0, [(10, 0.8, 0.82, 0.30), (20, 0.78, 0.61, 0.34)],
                  step_times={**{str(s): 2.0 for s in range(1, 21)}, "5": 1.5})
    rec = H.run_record(anchor, STEP0, none)
    assert [p["step"] for p in rec["curve"]] == [0, 10, 20]
    assert rec["curve"][0]["refusal_kept"] == 1.0 and rec["curve"][0]["over_refusal_small"] == 0.25
    assert rec["min_refusal_kept"] == pytest.approx(0.78 / 0.8)
    assert rec["gain_share"] == pytest.approx((1 - 0.61) / (1 - 0.6))
    # steps 1, 10 (checks) and 20 (check-free but evaluated) are left out: 17 plain steps at 2.0 and one at 1.5
    assert rec["step_time_ratio"] == pytest.approx(2.0)
    assert rec["curve"][1]["over_refusal_small"] == 0.30 and rec["curve"][2]["over_refusal_small"] == pytest.approx(0.33)
    assert rec["signals"] == anchor["checks"]
    assert math.isnan(H.run_record(anchor, STEP0, None)["gain_share"])


def test_targets_and_pareto_verdicts():
    runs = [_run("none", 0, [(10, 0.4, 0.8, 0.20), (20, 0.2, 0.6, 0.22)]),
            _run("none", 1, [(10, 0.5, 0.8, 0.20), (20, 0.3, 0.5, 0.22)]),
            _run("regularize", 0, [(10, 0.8, 0.82, 0.30), (20, 0.78, 0.61, 0.33)]),  # kept 97.5% everywhere, gain 97.5%
            _run("regularize", 1, [(10, 0.72, 0.80, 0.30), (20, 0.80, 0.51, 0.37)]),  # dips to 90% at step 10
            _run("ema", 0, [(10, 0.8, 0.9, 0.25), (20, 0.8, 0.6, 0.30)]),  # better or equal on all three: beats it
            _run("kl-train", 0, [(10, 0.8, 0.9, 0.25), (20, 0.8, 0.9, 0.30)])]  # keeps more, gains less: a trade-off
    res = H.analyse_horizon(runs, STEP0)
    s = res["summary"]["regularize/full"]
    assert s["seeds"] == [0, 1] and not s["kept_every_point"]  # seed 1 dipped below 95% at step 10
    assert s["gain"]  # 0.975 and (1 - 0.51) / (1 - 0.5) = 0.98
    assert s["over_refusal_mean"] == pytest.approx(0.35) and s["over_refusal_ok"]  # aligned 0.30 + 5 points
    verdicts = {p["variant"]: (p["beats_default"], p["beaten_by_default"]) for p in res["pareto"]}
    assert verdicts == {"ema": (True, False), "kl-train": (False, False)}
    md = H.horizon_markdown(res)
    assert "ema (full, s0) beats the default anchor" in md and "kl-train (full, s0) trades off" in md
    assert "| regularize/full | [0, 1] | no | yes | 35% (yes) |" in md
    json.dumps(res, default=float)


def test_side_by_side_cost_replaces_the_in_run_ratio_only_when_it_timed_every_variant():
    """With benchmarks/overhead.py's results covering every variant of a fine-tuning kind, each of its records'
    step-time ratio is the side-by-side one at the study's shape (the unguarded run is the study's ``none``); if
    one of its variants was not timed, that kind's ratios all stay in-run (one kind of number among the runs the
    Pareto verdicts compare), and the other kind is not affected."""
    runs = [_run("none", 0, [(10, 0.4, 0.8, 0.20), (20, 0.2, 0.6, 0.22)]),
            _run("regularize", 0, [(10, 0.8, 0.82, 0.30), (20, 0.78, 0.61, 0.33)]),
            _run("kl-train", 0, [(10, 0.8, 0.9, 0.25), (20, 0.8, 0.9, 0.30)], step_times={str(s): 3.0 for s in range(1, 21)}),
            _run("none", 0, [(10, 0.5, 0.8, 0.20), (20, 0.3, 0.7, 0.22)], finetune="lora"),
            _run("regularize", 0, [(10, 0.9, 0.8, 0.30), (20, 0.9, 0.7, 0.33)], finetune="lora",
                 step_times={str(s): 1.5 for s in range(1, 21)})]
    small = {"results": {"full": {"unguarded": {"ratio_amortized": 1.0}, "regularize": {"ratio_amortized": 1.31}}}}
    large = {"results": {"full": {"unguarded": {"ratio_amortized": 1.0}, "regularize": {"ratio_amortized": 1.12},
                                  "kl-train": {"ratio_amortized": 1.4}}}}
    partial = {r["variant"]: r for r in H.analyse_horizon(runs, STEP0, {"4x192": small, "8x512": large})["records"]
               if r["finetune"] == "full"}
    assert {r["step_time_ratio_source"] for r in partial.values()} == {"in run"}
    assert partial["regularize"]["step_time_ratio"] == pytest.approx(1.0) and partial["kl-train"]["step_time_ratio"] == pytest.approx(3.0)
    assert partial["regularize"]["step_time_ratio_4x192"] == 1.31 and math.isnan(partial["kl-train"]["step_time_ratio_4x192"])
    assert partial["kl-train"]["step_time_ratio_8x512"] == 1.4

    small["results"]["full"]["kl-train"] = {"ratio_amortized": 1.25}
    res = H.analyse_horizon(runs, STEP0, {"4x192": small, "8x512": large})
    rec = {r["variant"]: r for r in res["records"] if r["finetune"] == "full"}
    lora = {r["variant"]: r for r in res["records"] if r["finetune"] == "lora"}
    assert {r["step_time_ratio_source"] for r in rec.values()} == {"overhead 4x192"}
    assert {r["step_time_ratio_source"] for r in lora.values()} == {"in run"}
    assert lora["regularize"]["step_time_ratio"] == pytest.approx(1.5)
    assert (rec["none"]["step_time_ratio"], rec["regularize"]["step_time_ratio"], rec["kl-train"]["step_time_ratio"]) == (1.0, 1.31, 1.25)
    assert rec["regularize"]["step_time_ratio_in_run"] == pytest.approx(1.0) and rec["regularize"]["step_time_ratio_8x512"] == 1.12
    assert [(p["step_time_ratio"], p["default_step_time_ratio"]) for p in res["pareto"] if p["finetune"] == "full"] == [(1.25, 1.31)]
    assert "| 1.31 (overhead 4x192) | 1.12 |" in H.horizon_markdown(res)


def test_the_report_merges_one_shapes_cost_files_each_timing_its_own_fine_tuning_kind(tmp_path):
    """``overhead.py`` times the full fine-tuning variants in one run and the LoRA pair in another; the horizon
    report reads both files of the study's shape, so that both kinds carry the side-by-side ratio."""
    from benchmarks.rimbench import study_report as R

    runs = [_run("none", 0, [(10, 0.4, 0.8, 0.20), (20, 0.2, 0.6, 0.22)]),
            _run("regularize", 0, [(10, 0.8, 0.82, 0.30), (20, 0.78, 0.61, 0.33)]),
            _run("none", 0, [(10, 0.5, 0.8, 0.20), (20, 0.3, 0.7, 0.22)], finetune="lora"),
            _run("regularize", 0, [(10, 0.9, 0.8, 0.30), (20, 0.9, 0.7, 0.33)], finetune="lora")]
    (tmp_path / "runs").mkdir()
    for r in runs:
        (tmp_path / "runs" / f"{r['name']}.json").write_text(json.dumps(r))
    (tmp_path / "step0.json").write_text(json.dumps(STEP0))
    timed = {"full": {"unguarded": {"ratio_amortized": 1.0}, "regularize": {"ratio_amortized": 1.3}},
             "lora": {"unguarded": {"ratio_amortized": 1.0}, "regularize": {"ratio_amortized": 1.6}}}
    files = [tmp_path / "full.json", tmp_path / "lora.json", tmp_path / "absent.json"]
    for f, ft in zip(files, timed):
        f.write_text(json.dumps({"results": {ft: timed[ft]}}))
    R.analyse_and_write("horizon", tmp_path, [r["name"] for r in runs], tmp_path / "out", cost={"4x192": files})
    rec = {(r["variant"], r["finetune"]): r for r in json.loads((tmp_path / "out" / "results.json").read_text())}
    assert {r["step_time_ratio_source"] for r in rec.values()} == {"overhead 4x192"}
    assert rec[("regularize", "full")]["step_time_ratio"] == 1.3 and rec[("regularize", "lora")]["step_time_ratio"] == 1.6


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_run("none", 0, [(10, 0.4, 0.8, 0.20), (20, 0.2, 0.6, 0.22)]),
            _run("regularize", 0, [(10, 0.8, 0.82, 0.30), (20, 0.78, 0.61, 0.33)], finetune="lora")]
    paths = H.plot_horizon(H.analyse_horizon(runs, STEP0), tmp_path)
    assert [p.name for p in paths] == ["horizon_curves.png", "horizon_pareto.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
