from rimguard.policy import RiskPolicy

TH = {"warn": {"entanglement_z": 2.0}, "regularize": {"entanglement_z": 4.0, "refusal_drop": 1.0}, "freeze": {}, "stop": {}}


def test_levels_rise_with_thresholds_and_name_crossings():
    p = RiskPolicy(TH, hysteresis=0.0)
    assert p.update({"entanglement_z": 1.0}).level == "ok"
    d = p.update({"entanglement_z": 2.5})
    assert d.level == "warn" and d.changed and d.previous == "ok"
    assert [(c.metric, c.level) for c in d.crossings] == [("entanglement_z", "warn")]
    d = p.update({"entanglement_z": 0.0, "refusal_drop": 1.5})
    assert d.level == "regularize"


def test_hysteresis_prevents_flapping():
    p = RiskPolicy(TH, hysteresis=0.1)
    noisy = [2.1, 1.9, 2.05, 1.85, 2.2, 1.81]  # around the warn threshold 2.0, above 2.0 - 0.2
    levels = [p.update({"entanglement_z": v}).level for v in noisy]
    assert levels == ["warn"] * 6
    assert p.update({"entanglement_z": 1.79}).level == "ok"
    flappy = RiskPolicy(TH, hysteresis=0.0)
    assert [flappy.update({"entanglement_z": v}).level for v in noisy] == ["warn", "ok"] * 3


def test_patience_delays_escalation_only():
    p = RiskPolicy(TH, hysteresis=0.0, patience=2)
    assert p.update({"entanglement_z": 5}).level == "ok"
    assert p.update({"entanglement_z": 5}).level == "regularize"
    assert p.update({"entanglement_z": 0}).level == "ok"  # falls at once


def test_level_does_not_fall_while_the_unoptimised_witness_stays_down(tok, fast_config, llama_atlas):
    """escalate, activation penalty: z driven back down while the refusal margin keeps falling must not end on ok."""
    from rimguard import RIMGuard
    from rimguard.testing import tiny_model

    th = {"warn": {"entanglement_z": 2.0}, "regularize": {"entanglement_z": 3.0}, "freeze": {}, "stop": {}}
    guard = RIMGuard(fast_config(mode="escalate", regularizer="activation", thresholds=th, hysteresis=0.0), atlas=llama_atlas)
    guard.engine.setup(tiny_model("llama"), tok, inject_loss=False)
    script = iter([{"entanglement_z": 3.5, "refusal_drop": 4.0},   # -> regularize (the penalty starts)
                   {"entanglement_z": 0.1, "refusal_drop": 6.0},   # z pushed down, margin still falling: hold
                   {"entanglement_z": 0.1, "refusal_drop": 3.0}])  # the witness recovered: the level may fall
    guard.engine.monitor.measure = lambda: dict(next(script))
    levels = [guard.level for _ in range(3) if guard.engine.check(1) is not None]
    assert levels == ["regularize", "regularize", "ok"]
    guard.engine.teardown()
