"""Many fine-tunes of the aligned SmolLM2, one JSON record per run: the one runner of the real-model studies.

    python -m benchmarks.rim_study --preset horizon --threads 2     # 200-step prevention study against baselines
    python -m benchmarks.rim_study --preset validity2 --threads 2   # the alarm's validity on 40+ runs, pre-registered split
    python -m benchmarks.rim_study --preset horizon --report-only   # re-run an analysis from the run records

Presets (each resumes run by run: finished runs are kept in ``--out/runs/<run>.json`` and skipped):

* ``horizon`` (issue #24): a GSM8K chain-of-thought SFT shaped like a real one (200 optimizer steps at
  batch 4, 800 rows without repeats, 3% warmup then cosine decay, peak lr 1e-4), unguarded, with the
  default ``mode="regularize"`` and with the baselines of :mod:`benchmarks.rimbench.baselines`;
  refusal, over-refusal and held-out loss at steps 0, 25, 50, 100, 150, 200.
* ``validity2`` (issue #23): 48-step runs of many data conditions and actions, plus the horizon runs,
  split *by condition* into a calibration and a test half written here before any run (:data:`SPLIT`);
  refusal and held-out loss at steps 12, 24, 36, 48, XSTest's stratified 100 at step 48 only.
* ``validity``, ``prevention``, ``heads``: the 12-step studies of earlier issues (their records are in
  ``benchmarks/results/study/runs``; ``--out benchmarks/results/study``).

Every run logs every guard signal at every check (the guard monitors in all runs; it acts only in the
guarded variants), plus ``param_dist`` (||theta_t - theta_0||), ``kl_harmless`` (KL to the base model on
8 harmless prompts) and ``safety_drop_controls`` (``safety_drop`` of the atlas' 100 random layer-matched
neuron sets: the permutation null of the default alarm).

Prompt sets, kept disjoint:
* the monitor measures the atlas' first 24 bundled ``harmful`` probes (identified on bundled harmful 0-47);
* the safety anchor and the anchor-replay baseline train on the bundled ``anchor_harmful`` /
  ``anchor_harmless`` prompts; the refusal mixes and the 3% replay train on the model's own refusals to
  bundled harmful prompts 48-95;
* evaluation judges AdvBench prompts (a fixed sample of 48), XSTest's safe prompts and the last 50 GSM8K
  rows (held-out loss on 24 of them); ``harmful_comply`` trains on other AdvBench rows than the evaluated ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from benchmarks.rimbench import baselines as base
from benchmarks.rimbench import conditions as cond
from benchmarks.rimbench import data as bdata
from benchmarks.rimbench import peer as bpeer
from benchmarks.rimbench.callbacks import LossLog, ScheduledGuard, StepTimer
from rimguard.compat import no_checkpointing
from rimguard.demo import evaluation as ev

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
LR = 1e-4


@dataclass
class RunSpec:
    """One fine-tune: data condition, fine-tuning kind, seed, learning rate, guard action or baseline, and
    its length, schedule and evaluation points.

    Attributes:
        variant: the run's name for its action: ``none`` (the guard monitors only), a guard action
            (``guard`` holds its GuardConfig overrides) or a baseline (``replay-anchor-budget``,
            ``replay-3pct``, ``kl-train``, ``ema``).
        mix: share of the model's own refusals mixed into the rows (``refusal_mix`` condition).
        checks: the guard's check steps (None: the guard's default schedule).
        evals: steps of the held-out evaluation (step 0 is the shared ``step0.json``).
        xstest: where over-refusal is measured (the 12-step presets have their own final evaluation):
            ``every`` evaluation point (XSTest's stratified 100, all 250 at the last) or only the ``last``
            (the stratified 100: the alarm study needs refusal at every point, over-refusal only as context).
    """

    condition: str = "cot"
    finetune: str = "full"
    seed: int = 0
    lr: float = LR
    variant: str = "none"
    guard: dict[str, Any] = field(default_factory=dict)
    steps: int = 12
    schedule: str = "constant"  # or "cosine" (with warmup)
    warmup: int = 0
    mix: float = 0.0
    checks: list[int] | None = None
    evals: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    batch: int = 4
    xstest: str = "every"

    @property
    def name(self) -> str:
        length = "" if self.steps == 12 else f"-{self.steps}st"
        mix = f"-mix{self.mix:g}" if self.mix else ""
        return f"{self.condition}{mix}-{self.finetune}-lr{self.lr:g}-{self.variant}-s{self.seed}{length}"


# -- the 12-step studies (v1) -------------------------------------------------------------------
V1_CHECKS = [1, 3, 6, 9, 12]  # guard checks and baselines; step 3 is the early (25%) check
V1_GUARD = {"mode": "monitor", "num_safety_probes": 12, "margin_probes": 8, "kl_probes": 4, "max_new_tokens": 16,
            "probe_batch_size": 16, "probe_every": 10_000, "refusal_kl": False, "witness_tokens": 0}


def v1(condition: str = "cot", finetune: str = "full", seed: int = 0, lr: float = LR, variant: str = "none",
       guard: dict[str, Any] | None = None) -> RunSpec:
    return RunSpec(condition, finetune, seed, lr, variant, {**V1_GUARD, **(guard or {})}, checks=V1_CHECKS)


def validity_plan() -> list[RunSpec]:
    """8 conditions x 2 seeds first (16 runs, 3 of them shared with the prevention preset), then 4 more seeds."""
    plan = [v1("cot", seed=s) for s in (0, 1)] + [v1("cot", seed=s, lr=LR / 4) for s in (0, 1)]
    plan += [v1("cot", "lora", seed=s) for s in (0, 1)]
    plan += [v1(c, seed=s) for c in ("refusal_mix", "chat_distill", "answer_only", "effort_min", "harmful_comply") for s in (0, 1)]
    plan += [v1(c, seed=2) for c in ("cot", "effort_min", "harmful_comply", "refusal_mix")]
    return plan


VARIANTS: dict[str, dict[str, Any]] = {
    "activation": {"mode": "regularize", "regularizer": "activation", "reg_lambda": 1.0},
    "anchor-0.3": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 0.3},
    "anchor-1": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0},
    "anchor-3": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 3.0},
    "anchor-1-kl-only": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_act_weight": 0.0},
    "anchor-1-every4": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 4},
    "anchor-1-every8": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 8},
    "anchor-1-every4-bs4": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 4, "anchor_batch_size": 4},
    "params": {"mode": "regularize", "regularizer": "params", "reg_lambda": 10.0},
    "freeze-0.5%": {"mode": "freeze", "freeze_share": 0.005},
    "freeze-2%": {"mode": "freeze", "freeze_share": 0.02},
    "freeze-5%": {"mode": "freeze", "freeze_share": 0.05},
    "escalate": {"mode": "escalate"},
    "regularize": {"mode": "regularize"},  # the default action, whatever its defaults are
}


def prevention_plan() -> list[RunSpec]:
    """Unguarded and the default anchor at full FT seeds 0 and 1 and LoRA seed 0, every other action at
    full FT seed 0, then the remaining seeds of the other actions (run last: the study resumes run by run)."""
    def at(variant: str, seed: int = 0, finetune: str = "full") -> RunSpec:
        return v1("cot", finetune, seed=seed, variant=variant, guard=VARIANTS[variant])

    plan = [v1("cot", seed=s) for s in (0, 1)] + [v1("cot", "lora", seed=0)]
    plan += [at("anchor-1"), at("anchor-1", 1), at("anchor-1", 0, "lora")]
    plan += [at("anchor-1-kl-only", 1), at("anchor-1-kl-only", 0, "lora")]
    plan += [at(v) for v in ("anchor-0.3", "anchor-3", "anchor-1-kl-only", "activation", "escalate", "freeze-2%", "params",
                             "freeze-0.5%", "freeze-5%", "anchor-1-every4")]
    plan += [at(v, 1) for v in ("anchor-0.3", "anchor-3", "activation", "params")]
    plan += [at("anchor-1-every4", 1), at("anchor-1-every4", 0, "lora")]
    plan += [at(v, 0, "lora") for v in ("anchor-0.3", "anchor-3")]
    plan += [at(v) for v in ("anchor-1-every8", "anchor-1-every4-bs4")]
    return plan


HEADS = 8  # refusal heads monitored in the heads preset


def heads_plan() -> list[RunSpec]:
    """The validity preset's 8 conditions at seed 0, monitored with the refusal-head metric (issue #15)."""
    return [RunSpec(s.condition, s.finetune, 0, s.lr, "heads", {**s.guard, "refusal_heads": HEADS}, checks=s.checks)
            for s in validity_plan() if s.seed == 0]


# -- the long-horizon prevention study (issue #24) ----------------------------------------------
NEW_GUARD = {"mode": "monitor", "probe_batch_size": 16}  # the guard's defaults otherwise (checks: every 10, and 1, 2, 4, 8)
HORIZON_STEPS = 200
HORIZON_EVALS = [25, 50, 100, 150, 200]
# every variant's step time against the unguarded run's, side by side (benchmarks/overhead.py --preset study / user):
# the full fine-tuning variants in one run, the LoRA pair (--ft lora --modes regularize) in another
HORIZON_COST = {shape: [HERE / "results" / "overhead" / f"horizon-{shape}{ft}.json" for ft in ("", "-lora")] for shape in ("4x192", "8x512")}


def horizon(variant: str, seed: int = 0, finetune: str = "full") -> RunSpec:
    guard = {**NEW_GUARD, **VARIANTS.get(variant, {})}
    return RunSpec("cot", finetune, seed, LR, variant, guard, steps=HORIZON_STEPS, schedule="cosine", warmup=6, evals=HORIZON_EVALS)


def horizon_plan() -> list[RunSpec]:
    """In the order of the issue: an interrupted study has the most important runs first."""
    plan = [horizon("none", s) for s in (0, 1)] + [horizon("regularize", s) for s in (0, 1)]
    plan += [horizon(v) for v in ("replay-anchor-budget", "replay-3pct", "kl-train", "ema")]
    return plan + [horizon("none", 0, "lora"), horizon("regularize", 0, "lora")]


# -- the alarm's validity study, v2 (issue #23) -------------------------------------------------
V2_STEPS = 48
V2_EVALS = [12, 24, 36, 48]


def v2(condition: str, seed: int, lr: float = LR, variant: str = "none", finetune: str = "full", mix: float = 0.0) -> RunSpec:
    guard = {**NEW_GUARD, **VARIANTS.get(variant, {})}
    return RunSpec(condition, finetune, seed, lr, variant, guard, steps=V2_STEPS, mix=mix, evals=V2_EVALS, xstest="last")


# Conditions (a data condition with its action, lr and fine-tuning kind; every seed of a condition goes to
# the same half), assigned to the calibration or the test half before any run of this study. Thresholds are
# chosen on calibration runs only; every headline number is on the test half.
V2_CONDITIONS: dict[str, tuple[str, list[RunSpec]]] = {
    "cot": ("calibration", [v2("cot", s) for s in (0, 1)]),
    "lora": ("test", [v2("cot", s, finetune="lora") for s in (0, 1)]),
    "answer_only": ("calibration", [v2("answer_only", s) for s in (0, 1)]),
    "effort_min": ("test", [v2("effort_min", s) for s in (0, 1)]),
    "harmful_comply": ("calibration", [v2("harmful_comply", s) for s in (0, 1)]),
    "chat_distill": ("test", [v2("chat_distill", s) for s in (0, 1)]),
    "cot-lr5e-5": ("calibration", [v2("cot", s, lr=5e-5) for s in (0, 1)]),
    "activation": ("test", [v2("cot", s, variant="activation") for s in (0, 1)]),
    "anchor-1": ("calibration", [v2("cot", s, variant="anchor-1") for s in (0, 1, 2)]),
    "anchor-3": ("test", [v2("cot", s, variant="anchor-3") for s in (0, 1)]),
    "refusal-25": ("calibration", [v2("refusal_mix", s, mix=0.25) for s in (0, 1)]),
    "refusal-50": ("test", [v2("refusal_mix", s, mix=0.5) for s in (0, 1)]),
    "cot-lr1e-5": ("calibration", [v2("cot", s, lr=1e-5) for s in (0, 1)]),
    "params": ("test", [v2("cot", s, variant="params") for s in (0, 1)]),
    "anchor-0.3": ("calibration", [v2("cot", s, variant="anchor-0.3") for s in (0, 1)]),
    "cot-lr2.5e-5": ("test", [v2("cot", s, lr=2.5e-5) for s in (0, 1)]),
    # the horizon study's runs, reused as records (same runner, 200 steps)
    "h-none": ("test", [horizon("none", s) for s in (0, 1)]),
    "h-regularize": ("test", [horizon("regularize", s) for s in (0, 1)]),
    "h-replay-anchor": ("calibration", [horizon("replay-anchor-budget")]),
    "h-replay-3pct": ("test", [horizon("replay-3pct")]),
    "h-kl-train": ("calibration", [horizon("kl-train")]),
    "h-ema": ("test", [horizon("ema")]),
    "h-lora": ("calibration", [horizon("none", 0, "lora")]),
    "h-regularize-lora": ("test", [horizon("regularize", 0, "lora")]),
}
SPLIT: dict[str, str] = {spec.name: half for half, specs in V2_CONDITIONS.values() for spec in specs}
CONDITION_OF: dict[str, str] = {spec.name: name for name, (_, specs) in V2_CONDITIONS.items() for spec in specs}


def validity2_plan() -> list[RunSpec]:
    """The horizon runs first (they are the prevention study too), then the 48-step runs, one seed of every
    condition before the second."""
    short = [s for name, (_, specs) in V2_CONDITIONS.items() if not name.startswith("h-") for s in specs]
    return horizon_plan() + sorted(short, key=lambda s: s.seed)


PLANS = {"validity": validity_plan, "prevention": prevention_plan, "heads": heads_plan, "horizon": horizon_plan,
         "validity2": validity2_plan}
V1_PRESETS = ("validity", "prevention", "heads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PLANS), required=True)
    p.add_argument("--out", type=Path, default=None, help="runs, atlas and step-0 evaluation [results/study for the 12-step "
                   "presets, results/study3 for horizon and validity2]")
    p.add_argument("--harmful", type=Path, default=SHARED / "advbench" / "harmful_behaviors.csv")
    p.add_argument("--xstest", type=Path, default=SHARED / "xstest" / "xstest_prompts.csv")
    p.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k" / "train.jsonl")
    p.add_argument("--n-harmful", type=int, default=48, help="AdvBench prompts judged at each eval point")
    p.add_argument("--n-accuracy", type=int, default=50, help="held-out GSM8K questions for exact-match accuracy at the end")
    p.add_argument("--limit", type=int, default=None, help="run at most this many new runs, then analyse")
    p.add_argument("--only", nargs="*", default=None, help="run only these run names")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    args.out = args.out or HERE / "results" / ("study" if args.preset in V1_PRESETS else "study3")
    return args


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- shared context -----------------------------------------------------------------------------
class Study:
    """Subject, data, atlas and the step-0 evaluation, built once per process."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from rimguard import GuardConfig, NeuronAtlas
        from rimguard.demo.zoo import aligned_smollm2
        from rimguard.probes import bundled

        self.args = args
        self.folder = aligned_smollm2()
        self.tok = AutoTokenizer.from_pretrained(str(self.folder))
        gsm = bdata.load_gsm8k(args.gsm8k)
        self.gsm_pool, held = bdata.split_gsm8k(gsm, 50, len(gsm) - 50, 0)
        v1_preset = args.preset in V1_PRESETS
        self.gsm_loss = ev.completion_examples(self.tok, bdata.conversational(held[: 12 if v1_preset else 24]), 256)
        self.gsm_acc = held[: args.n_accuracy]
        adv = bdata._csv_rows(args.harmful, ["goal", "target"])
        eval_idx = set(bdata.sample(range(len(adv)), args.n_harmful, seed=0))
        self.harmful = [adv[i]["goal"] for i in sorted(eval_idx)]
        self.comply = [adv[i] for i in range(len(adv)) if i not in eval_idx]
        safe = bdata.load_xstest(args.xstest)
        self.xstest = [r["prompt"] for r in safe]
        self.xstest_small = [r["prompt"] for r in bdata.stratified(safe, 100, seed=0)]  # intermediate points: 100, over types
        heads = HEADS if args.preset == "heads" else 0  # the same neurons, plus refusal heads
        atlas_dir = args.out / ("atlas-heads" if heads else "atlas")
        if not (atlas_dir / "atlas.json").is_file():
            say(f"identifying the atlas (48 pairs, 100 control sets{f', {heads} refusal heads' if heads else ''})")
            config = GuardConfig(num_safety_probes=48, top_m=0.01, min_share=0.5, num_controls=100, refusal_heads=heads,
                                 max_new_tokens=16 if v1_preset else 24, max_length=192, probe_batch_size=16)
            NeuronAtlas.from_config(self.model(0), self.tok, config).save(atlas_dir)
        self.atlas = NeuronAtlas.load(atlas_dir)
        overlap = set(self.harmful) & set(bundled("anchor_harmful") + bundled("harmful"))
        assert not overlap, f"evaluation prompts overlap training or probe prompts: {sorted(overlap)[:3]}"
        self.step0 = self._step0()

    def model(self, seed: int):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=torch.float32)

    def _step0(self) -> dict[str, Any]:
        path = self.args.out / "step0.json"
        if path.is_file():
            return json.loads(path.read_text())
        say("step-0 evaluation of the aligned model")
        model = self.model(0)
        rec = {**self.refusal(model, keep=True), "gsm8k_loss": self.loss(model), **self.over_refusal_all(model),
               **self.accuracy(model)}
        self.args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
        return rec

    # -- evaluation (held-out sets) --------------------------------------------------------------
    def refusal(self, model, keep: bool = False) -> dict[str, Any]:
        return ev.refusal(model, self.tok, self.harmful, 24, batch_size=48, keep=len(self.harmful) if keep else 0)

    def final_eval(self, model, accuracy: bool = True, small: bool = False) -> dict[str, Any]:
        """XSTest over-refusal on the safe prompts (all 250, or the stratified 100) and (if ``accuracy``) GSM8K
        exact-match accuracy (greedy, 200 tokens)."""
        out = ev.over_refusal(model, self.tok, self.xstest_small if small else self.xstest, batch_size=64, keep=40)
        return {**out, **self.accuracy(model)} if accuracy else out

    def accuracy(self, model) -> dict[str, Any]:
        return ev.accuracy(model, self.tok, [r["question"] for r in self.gsm_acc], [cond.final_answer(r["answer"]) for r in self.gsm_acc],
                           keep=5)

    def over_refusal_all(self, model) -> dict[str, Any]:
        """Over-refusal on all safe XSTest prompts (with every sample), and ``over_refusal_small``: the rate on the
        stratified 100 among them, which the intermediate points measure."""
        out = ev.over_refusal(model, self.tok, self.xstest, batch_size=64, keep=len(self.xstest))
        small = set(self.xstest_small)
        verdicts = [s["verdict"] for s in out["samples_xstest"] if s["prompt"] in small]
        out["over_refusal_small"] = verdicts.count("refusal") / len(verdicts)
        return out

    def loss(self, model) -> float:
        from rimguard.passes import pad_id

        return ev.heldout_loss(model, self.gsm_loss, pad_id(self.tok), 12)

    # -- training data ---------------------------------------------------------------------------
    def own(self, name: str, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
        """The aligned model's own greedy answers to ``prompts`` as records, generated once (``own-<name>.json``)."""
        from rimguard.passes import generate

        path = self.args.out / f"own-{name}.json"
        if not path.is_file():
            answers = generate(self.model(0), self.tok, prompts, max_new_tokens, 48)
            path.write_text(json.dumps([cond.record(p, a.strip()) for p, a in zip(prompts, answers)]))
        return json.loads(path.read_text())

    def records(self, spec: RunSpec) -> list[dict[str, Any]]:
        from rimguard.probes import bundled
        from rimguard.signals.witness import default_judge

        count = spec.steps * spec.batch
        rows = list(self.gsm_pool)
        random.Random(spec.seed).shuffle(rows)
        rows = rows[:count]
        c = spec.condition
        if spec.variant == "replay-anchor-budget":  # the anchor's rows at the anchor's rate, as plain SFT rows
            anchor = bundled("anchor_harmful") + bundled("anchor_harmless")
            return base.replay_mix(bdata.conversational(rows), self.own("anchor", anchor, 32), round(spec.steps * base.ANCHOR_ROWS_PER_STEP),
                                   spec.seed)
        if spec.variant == "replay-3pct":  # the model's own refusals as 3% of the rows
            refusals = [r for r in self.own("refusal_mix", bundled("harmful")[48:], 64) if default_judge(r["completion"][0]["content"])]
            extra = round(0.03 * count)
            return base.replay_mix(bdata.conversational(rows[: count - extra]), refusals, extra, spec.seed)
        if c == "cot":
            return bdata.conversational(rows)
        if c == "answer_only":
            return cond.answer_only(rows)
        if c == "effort_min":
            return cond.effort_min(rows, spec.seed)
        if c == "harmful_comply":
            return cond.mix(bdata.conversational(rows), cond.comply_records(self.comply), 4, spec.seed)
        if c == "refusal_mix":
            extra = self.own("refusal_mix", bundled("harmful")[48:], 64)
            return cond.mix(bdata.conversational(rows), extra, round(1 / spec.mix) if spec.mix else 20, spec.seed)
        if c == "chat_distill":
            extra = self.own("chat_distill", bundled("harmless"), 64)
            random.Random(spec.seed).shuffle(extra)
            return (extra * (count // len(extra) + 1))[:count]
        raise ValueError(f"unknown condition {c}")


# -- one run ------------------------------------------------------------------------------------
def _kl_batch(tok, prompts):
    from rimguard.passes import encode, format_prompt, pad, pad_id

    return pad([encode(tok, format_prompt(tok, p)) for p in prompts], pad_id(tok))


class Signals(TrainerCallback):
    """At each guard check (after it): the guard's record, plus ||theta_t - theta_0||, KL on harmless prompts and
    the control sets' safety_drop (and, for the v1 validity preset, its baselines and the peer)."""

    def __init__(self, study: Study, guard: Any, peer: Any, v1_full: bool, last: int, early: int = 3) -> None:
        self.study, self.guard, self.peer, self.v1_full, self.last, self.early = study, guard, peer, v1_full, last, early
        self.rows: list[dict[str, Any]] = []
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from rimguard.passes import next_token_logprobs, probe_mode
        from rimguard.probes import bundled

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.harmless = _kl_batch(self.study.tok, bundled("harmless")[-8:])
        with probe_mode(model):
            top = next_token_logprobs(model, self.harmless).topk(64, dim=-1)
        self.kl_ref = (top.values, top.indices)
        if self.peer is not None:
            self.peer.start(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        from rimguard.passes import next_token_logprobs, probe_mode
        from rimguard.signals import metrics

        step = state.global_step
        record = next((h for h in self.guard.history if h["step"] == step), None)
        if record is None:
            return
        t0 = time.perf_counter()
        row: dict[str, Any] = {"step": step, **{k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}}
        row["safety_drop_controls"] = self.guard.engine.monitor.per_set().get("safety_drop", [None])[1:]
        row["ras_controls"] = self.guard.engine.monitor.per_set().get("ras", [None])[1:]
        with torch.no_grad():
            row["param_dist"] = float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self.params, self.start))))
        with probe_mode(model):
            logp = next_token_logprobs(model, self.harmless)
        row["kl_harmless"] = float(metrics.topk_kl(self.kl_ref[0], self.kl_ref[1], logp, self.harmless.attention_mask))
        if self.v1_full:  # the 12-step validity study's behavioural probe and task loss at every check
            from rimguard.passes import generate
            from rimguard.signals.judge import judge

            probes = self.guard.atlas.probe_prompts[:8]
            row["probe_refusal"] = [judge(t) for t in generate(model, self.study.tok, probes, 12, 8)].count("refusal") / len(probes)
            row["gsm8k_loss"] = self.study.loss(model)
            if self.peer is not None and step in (self.early, self.last):
                row["peer_cosine"] = self.peer.measure(model, step).get(bpeer.COSINE)
        self.seconds += time.perf_counter() - t0
        self.rows.append(row)


class Evals(TrainerCallback):
    """Held-out evaluation at the run's eval points: refusal (48 AdvBench prompts), over-refusal on XSTest's
    stratified 100 (all 250 at the last point; at the last point only for ``xstest="last"``) and the held-out
    GSM8K loss; on the EMA weights for ``ema``."""

    def __init__(self, study: Study, spec: RunSpec, ema: base.WeightEMA | None) -> None:
        self.study, self.spec, self.ema = study, spec, ema
        self.curve: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.seconds = 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in self.spec.evals:
            return
        t0 = time.perf_counter()
        last = step == self.spec.steps
        v1_preset = self.study.args.preset in V1_PRESETS
        with self.ema.swapped() if self.ema is not None else _nothing():
            point = {"step": step, **self.study.refusal(model, keep=last), "gsm8k_loss": self.study.loss(model)}
            if v1_preset:
                if last:
                    self.final = self.study.final_eval(model, accuracy=self.study.args.preset == "prevention",
                                                       small=self.study.args.preset != "prevention")
            elif self.spec.xstest == "last":
                if last:
                    self.final = self.study.final_eval(model, accuracy=False, small=True)
                    point.update({k: v for k, v in self.final.items() if k != "samples_xstest"})
            elif last:  # all 250 safe prompts at the end, and the intermediate points' 100 among them (like with like)
                self.final = self.study.over_refusal_all(model)
                point.update({k: v for k, v in self.final.items() if k != "samples_xstest"})
            else:
                point.update(self.study.final_eval(model, accuracy=False, small=True))
        self.seconds += time.perf_counter() - t0
        self.curve.append(point)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def run(spec: RunSpec, study: Study) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from rimguard import GuardConfig

    started = time.perf_counter()
    workdir = study.args.out / "work" / spec.name
    guard_cfg = GuardConfig(**{"max_length": 192, "log_file": "rimguard.jsonl", **spec.guard})
    guard = ScheduledGuard(guard_cfg, atlas=study.atlas, check_steps=spec.checks or [s for s in range(1, spec.steps + 1)
                                                                                       if guard_cfg.monitor.is_check_step(s) or s == spec.steps])
    v1_full = study.args.preset in ("validity", "heads")
    with_peer = v1_full and study.args.preset != "heads" and bpeer.available()[0]
    peer = bpeer.Peer(study.tok, workdir / "peer", pairs=16, batch_size=16, max_length=128) if with_peer else None
    signals = Signals(study, guard, peer, v1_full, spec.steps)
    timer, losses = StepTimer(), LossLog()
    lora = LoraConfig(r=32, lora_alpha=64, use_rslora=True, target_modules="all-linear", lora_dropout=0.0,
                      task_type="CAUSAL_LM") if spec.finetune == "lora" else None
    records = study.records(spec)
    model = study.model(spec.seed)
    setup = base.baseline(spec.variant, model, SFTTrainer, spec.batch)
    evals = Evals(study, spec, setup.ema)
    args = SFTConfig(output_dir=str(workdir), max_steps=spec.steps, per_device_train_batch_size=setup.batch, learning_rate=spec.lr,
                     lr_scheduler_type=spec.schedule, warmup_steps=spec.warmup, weight_decay=0.0, max_length=192, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False, **no_checkpointing(), seed=spec.seed,
                     data_seed=spec.seed, disable_tqdm=True, dataloader_num_workers=0)
    callbacks = [guard, timer, signals, *setup.callbacks, evals, losses]
    trainer = setup.trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=study.tok,
                                callbacks=callbacks, peft_config=lora)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    out = {"name": spec.name, **asdict(spec), "rows": len(records), "checks": signals.rows, "curve": evals.curve,
           "final": evals.final, "train_loss": losses.losses, "step_times": timer.times,
           "frozen": guard.engine.freezer.count if guard.engine.freezer else 0, "optimised_signals": guard.engine.optimised_signals(),
           "kl_train": setup.kl.logged if setup.kl is not None else None,
           "seconds": {"total": time.perf_counter() - started, "signals": signals.seconds, "evals": evals.seconds,
                       "guard_setup": guard.setup_seconds}}
    if study.args.preset in V1_PRESETS:  # the 12-step records keep their own layout: eval rows merged into the check rows
        for point in evals.curve:
            row = next((r for r in out["checks"] if r["step"] == point["step"]), None)
            if row is None:
                out["checks"].append(point)
            else:
                row.update(point)
        out["checks"].sort(key=lambda r: r["step"])
    del trainer, model, guard, setup
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    import warnings

    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("rimguard").setLevel(logging.ERROR)
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = PLANS[args.preset]()
    if not args.report_only:
        study = Study(args)
        todo = [s for s in plan if not (runs_dir / f"{s.name}.json").is_file() and (args.only is None or s.name in args.only)]
        say(f"{args.preset}: {len(plan)} runs, {len(plan) - len(todo)} done, {len(todo)} to run")
        for spec in todo[: args.limit]:
            say(f"{spec.name}: start ({spec.steps} steps)")
            rec = run(spec, study)
            tmp = runs_dir / f".{spec.name}.json.tmp"
            tmp.write_text(json.dumps(rec, indent=1, default=float))
            tmp.replace(runs_dir / f"{spec.name}.json")
            last = rec["curve"][-1] if rec["curve"] else {}
            say(f"{spec.name}: refusal {last.get('refusal_rate', math.nan):.0%}, gsm8k loss {last.get('gsm8k_loss', math.nan):.3f}, "
                f"over-refusal {rec['final'].get('over_refusal', math.nan):.0%} [{rec['seconds']['total']:.0f}s]")
    from benchmarks.rimbench.study_report import analyse_and_write

    analyse_and_write(args.preset, args.out, [s.name for s in plan], HERE / "results" / {"validity2": "validity-v2"}.get(args.preset, args.preset),
                      SPLIT, CONDITION_OF, HORIZON_COST)


if __name__ == "__main__":
    main()
