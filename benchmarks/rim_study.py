"""Many short fine-tunes of the aligned SmolLM2, one JSON record per run: does the risk signal tell
runs that forget from runs that do not (``--preset validity``), and which action prevents
forgetting at what cost (``--preset prevention``)?

    python benchmarks/rim_study.py --preset validity --threads 2      # 8 conditions x seeds, unguarded (monitor)
    python benchmarks/rim_study.py --preset prevention --threads 2    # actions at the same seeds, data, steps
    python benchmarks/rim_study.py --preset validity --report-only    # re-run the analysis from the run records

Both presets share the runner, the subject (``rimguard.demo.zoo.aligned_smollm2``), the atlas (identified
once on the aligned model, 100 layer-matched control sets) and the unguarded runs (a prevention
variant ``none`` is the validity condition ``cot`` / ``lora`` at the same seed). Finished runs are
kept in ``--out/runs/<run>.json`` and skipped on the next call (the study resumes run by run).

Prompt sets, kept disjoint:
* the guard's monitor measures rimguard's bundled ``harmful`` probes (the atlas' first 12);
* the safety anchor trains on the bundled ``anchor_harmful`` / ``anchor_harmless`` prompts;
* the study's ``refusal_mix`` condition trains on the model's own refusals to bundled harmful
  prompts 48-95 (neither atlas nor monitor uses them);
* evaluation judges AdvBench prompts (a fixed sample of 48), XSTest's safe prompts, and the last 50
  GSM8K rows; ``harmful_comply`` trains on other AdvBench rows than the evaluated ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from rimbench import conditions as cond  # noqa: E402
from rimbench import data as bdata  # noqa: E402
from rimbench import peer as bpeer  # noqa: E402
from rimbench.evaluation import StepTimer, completion_examples, heldout_loss  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rimguard.compat import no_checkpointing  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
STEPS = 12
CHECKS = [1, 3, 6, 9, 12]  # guard checks and baselines; step 3 is the early (25%) check
EVALS = [3, 6, 9, 12]  # held-out refusal (plus step 0, shared)
EARLY = 3  # 25% of training: the check whose values the validity analysis reads
LR = 1e-4


@dataclass
class RunSpec:
    """One fine-tune: its data condition, fine-tuning kind, seed, learning rate and guard."""

    condition: str = "cot"
    finetune: str = "full"
    seed: int = 0
    lr: float = LR
    variant: str = "none"  # the guard's action; "none": monitor only
    guard: dict[str, Any] = field(default_factory=dict)  # GuardConfig overrides of the variant

    @property
    def name(self) -> str:
        return f"{self.condition}-{self.finetune}-lr{self.lr:g}-{self.variant}-s{self.seed}"


def validity_plan() -> list[RunSpec]:
    """8 conditions x 2 seeds first (16 runs, 3 of them shared with the prevention preset), then 4 more seeds."""
    plan = [RunSpec("cot", seed=s) for s in (0, 1)]
    plan += [RunSpec("cot", seed=s, lr=LR / 4) for s in (0, 1)]
    plan += [RunSpec("cot", "lora", seed=s) for s in (0, 1)]
    plan += [RunSpec(c, seed=s) for c in ("refusal_mix", "chat_distill", "answer_only", "effort_min", "harmful_comply") for s in (0, 1)]
    plan += [RunSpec(c, seed=2) for c in ("cot", "effort_min", "harmful_comply", "refusal_mix")]
    return plan


VARIANTS: dict[str, dict[str, Any]] = {
    "activation": {"mode": "regularize", "regularizer": "activation", "reg_lambda": 1.0},
    "anchor-0.3": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 0.3},
    "anchor-1": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0},
    "anchor-3": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 3.0},
    "anchor-1-kl-only": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_act_weight": 0.0},
    "anchor-1-every4": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 4},
    # the anchor's cost curve (issue #14): cheaper than the default, by schedule or by batch
    "anchor-1-every8": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 8},
    "anchor-1-every4-bs4": {"mode": "regularize", "regularizer": "anchor", "reg_lambda": 1.0, "anchor_every": 4,
                            "anchor_batch_size": 4},
    "params": {"mode": "regularize", "regularizer": "params", "reg_lambda": 10.0},
    "freeze-0.5%": {"mode": "freeze", "freeze_share": 0.005},
    "freeze-2%": {"mode": "freeze", "freeze_share": 0.02},
    "freeze-5%": {"mode": "freeze", "freeze_share": 0.05},
    "escalate": {"mode": "escalate"},
}


def prevention_plan() -> list[RunSpec]:
    """Unguarded and the default anchor at full FT seeds 0 and 1 and LoRA seed 0, every other action at
    full FT seed 0, then the remaining seeds of the other actions (run last: the study resumes run by run)."""
    def at(variant: str, seed: int = 0, finetune: str = "full") -> RunSpec:
        return RunSpec("cot", finetune, seed=seed, variant=variant, guard=VARIANTS[variant])

    plan = [RunSpec("cot", seed=s) for s in (0, 1)] + [RunSpec("cot", "lora", seed=0)]
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
    """The validity preset's 8 conditions at seed 0, monitored with the refusal-head metric (issue #15):
    does the heads' attention shift onto a reasoning span track refusal loss across runs?"""
    return [RunSpec(s.condition, s.finetune, seed=0, lr=s.lr, variant="heads", guard={"refusal_heads": HEADS})
            for s in validity_plan() if s.seed == 0]


PLANS = {"validity": validity_plan, "prevention": prevention_plan, "heads": heads_plan}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PLANS), required=True)
    p.add_argument("--out", type=Path, default=HERE / "results" / "study", help="runs and atlas (shared by the presets)")
    p.add_argument("--harmful", type=Path, default=SHARED / "advbench" / "harmful_behaviors.csv")
    p.add_argument("--xstest", type=Path, default=SHARED / "xstest" / "xstest_prompts.csv")
    p.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k" / "train.jsonl")
    p.add_argument("--n-harmful", type=int, default=48, help="AdvBench prompts judged at each eval point")
    p.add_argument("--n-xstest", type=int, default=None, help="XSTest safe prompts at the end (default all 250)")
    p.add_argument("--n-accuracy", type=int, default=50, help="held-out GSM8K questions for exact-match accuracy at the end")
    p.add_argument("--limit", type=int, default=None, help="run at most this many new runs, then analyse")
    p.add_argument("--only", nargs="*", default=None, help="run only these run names")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- shared context -----------------------------------------------------------------------------
class Study:
    """Subject, data, atlas and the step-0 evaluation, built once per process."""

    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoTokenizer

        from rimguard import NeuronAtlas
        from rimguard.probes import bundled
        from rimguard.demo.zoo import aligned_smollm2

        self.args = args
        self.folder = aligned_smollm2()
        self.tok = AutoTokenizer.from_pretrained(str(self.folder))
        gsm = bdata.load_gsm8k(args.gsm8k)
        self.gsm_pool, held = bdata.split_gsm8k(gsm, 50, len(gsm) - 50, 0)
        self.gsm_loss = completion_examples(self.tok, bdata.conversational(held[:12]), 256)
        self.gsm_acc = held[: args.n_accuracy]
        adv = bdata._csv_rows(args.harmful, ["goal", "target"])
        eval_idx = set(bdata.sample(range(len(adv)), args.n_harmful, seed=0))
        self.harmful = [adv[i]["goal"] for i in sorted(eval_idx)]
        self.comply = [adv[i] for i in range(len(adv)) if i not in eval_idx]
        safe = bdata.load_xstest(args.xstest)
        self.xstest = [r["prompt"] for r in bdata.stratified(safe, args.n_xstest, seed=0)]
        self.xstest_small = [r["prompt"] for r in bdata.stratified(safe, 100, seed=0)]  # validity runs: 100, spread over types
        heads = HEADS if args.preset == "heads" else 0  # the same neurons, plus refusal heads
        atlas_dir = args.out / ("atlas-heads" if heads else "atlas")
        if not (atlas_dir / "atlas.json").is_file():
            say(f"identifying the atlas (48 pairs, 100 control sets{f', {heads} refusal heads' if heads else ''})")
            base = self.model(0)
            NeuronAtlas.identify(base, self.tok, bundled("harmful")[:48], bundled("intent"),
                                 bundled("harmless") if heads else (), top_m=0.01, min_share=0.5, num_controls=100,
                                 max_new_tokens=16, max_length=192, batch_size=16, seed=0, progress=False,
                                 refusal_heads=heads).save(atlas_dir)
            del base
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
        base = self.model(0)
        t = time.perf_counter()
        rec = {**self.refusal(base, full=True), "gsm8k_loss": self.loss(base)}
        say(f"  refusal and loss {time.perf_counter() - t:.0f}s")
        rec.update(self.final_eval(base))
        say(f"  with XSTest and GSM8K accuracy {time.perf_counter() - t:.0f}s")
        self.args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))
        return rec

    # -- evaluation (held-out sets) --------------------------------------------------------------
    def refusal(self, model, full: bool = False) -> dict[str, Any]:
        from rimguard.demo.judge import judge
        from rimguard.passes import generate

        texts = generate(model, self.tok, self.harmful, 24, batch_size=48)
        verdicts = [judge(t) for t in texts]
        rec = {"refusal_rate": verdicts.count("refusal") / len(verdicts), "garbage_rate": verdicts.count("garbage") / len(verdicts),
               "n_harmful": len(verdicts)}
        if full:
            rec["samples_harmful"] = [{"prompt": p, "completion": t, "verdict": v} for p, t, v in zip(self.harmful, texts, verdicts)]
        return rec

    def final_eval(self, model, accuracy: bool = True) -> dict[str, Any]:
        """XSTest over-refusal on the safe prompts and (if ``accuracy``) GSM8K exact-match accuracy (greedy, 200 tokens)."""
        from rimguard.demo.judge import judge
        from rimguard.passes import generate

        prompts = self.xstest if accuracy else self.xstest_small
        texts = generate(model, self.tok, prompts, 24, batch_size=64)
        verdicts = [judge(t) for t in texts]
        out = {"over_refusal": verdicts.count("refusal") / len(verdicts), "xstest_garbage_rate": verdicts.count("garbage") / len(verdicts),
               "n_xstest": len(verdicts),
               "samples_xstest": [{"prompt": p, "completion": t, "verdict": v} for p, t, v in zip(prompts[:40], texts, verdicts)]}
        if accuracy:
            answers = generate(model, self.tok, [r["question"] for r in self.gsm_acc], 200, batch_size=50)
            right = [_number(a) == _number(cond.final_answer(r["answer"])) for a, r in zip(answers, self.gsm_acc)]
            out.update({"gsm8k_accuracy": sum(right) / len(right), "n_accuracy": len(right),
                        "samples_gsm8k": [{"question": r["question"], "completion": a, "correct": c}
                                          for r, a, c in zip(self.gsm_acc[:5], answers, right)]})
        return out

    def loss(self, model) -> float:
        from rimguard.passes import pad_id

        return heldout_loss(model, self.gsm_loss, pad_id(self.tok), 12)

    # -- training data ---------------------------------------------------------------------------
    def records(self, spec: RunSpec, count: int) -> list[dict[str, Any]]:
        import random

        from rimguard.probes import bundled
        from rimguard.passes import generate

        rows = list(self.gsm_pool)
        random.Random(spec.seed).shuffle(rows)
        rows = rows[:count]
        c = spec.condition
        if c == "cot":
            return bdata.conversational(rows)
        if c == "answer_only":
            return cond.answer_only(rows)
        if c == "effort_min":
            return cond.effort_min(rows, spec.seed)
        if c == "harmful_comply":
            return cond.mix(bdata.conversational(rows), cond.comply_records(self.comply), 4, spec.seed)
        own = self.args.out / f"own-{c}.json"  # the aligned model's own answers, generated once
        if not own.is_file():
            prompts = bundled("harmful")[48:] if c == "refusal_mix" else bundled("harmless")
            base = self.model(0)
            own.write_text(json.dumps([cond.record(p, a.strip()) for p, a in zip(prompts, generate(base, self.tok, prompts, 64, 48))]))
            del base
        extra = json.loads(own.read_text())
        if c == "refusal_mix":
            return cond.mix(bdata.conversational(rows), extra, 20, spec.seed)
        if c == "chat_distill":
            random.Random(spec.seed).shuffle(extra)
            return (extra * (count // len(extra) + 1))[:count]
        raise ValueError(f"unknown condition {c}")


def _number(text: str) -> str | None:
    import re

    found = re.findall(r"-?\d[\d,]*\.?\d*", text.replace("$", ""))
    return found[-1].replace(",", "").rstrip(".") if found else None


# -- one run ------------------------------------------------------------------------------------
class Baselines(TrainerCallback):
    """At the check steps (after the guard's own check): the baseline signals and the held-out refusal."""

    def __init__(self, study: Study, guard: Any, peer: Any, full: bool = True) -> None:
        self.study, self.guard, self.peer, self.full = study, guard, peer, full
        self.rows: list[dict[str, Any]] = []
        self.start: list[torch.Tensor] = []
        self.kl_ref: tuple | None = None
        self.seconds = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from rimguard.probes import bundled

        if not self.full:
            return
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self.harmless = _kl_batch(self.study.tok, bundled("harmless")[-8:])
        self.kl_ref = _topk(model, self.harmless)
        if self.peer is not None:
            self.peer.start(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step not in CHECKS:
            return
        if not self.full:  # prevention: the guard's own signals at every check, held-out refusal at the end
            row = {"step": step, **{k: v for h in self.guard.history if h["step"] == step for k, v in h.items()
                                    if isinstance(v, (int, float)) and k != "step"}}
            if step == STEPS:
                row.update(self.study.refusal(model, full=True))
                row["gsm8k_loss"] = self.study.loss(model)
            self.rows.append(row)
            return
        t0 = time.perf_counter()
        from rimguard.signals import metrics
        from rimguard.demo.judge import judge
        from rimguard.passes import generate

        g = self.guard
        row: dict[str, Any] = {"step": step}
        hist = [h for h in g.history if h["step"] == step]
        if hist:
            row.update({k: v for k, v in hist[-1].items() if isinstance(v, (int, float)) and k != "step"})
        mon = g.engine.monitor
        if mon is not None and mon.safe_now is not None:  # RAS of every control set: the permutation null
            task_now = mon.ema_task
            per_set = metrics.ras(mon.ref_safe[mon.sets], mon.safe_now[mon.sets], mon.ref_task[mon.sets], task_now[mon.sets],
                                  g.config.monitor.rel_floor)
            row["ras_controls"] = per_set["ras"][1:].tolist()
        with torch.no_grad():
            row["param_dist"] = float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(self.params, self.start))))
        row["gsm8k_loss"] = self.study.loss(model)
        row["kl_harmless"] = _kl_now(model, self.harmless, self.kl_ref)
        probes = g.atlas.probe_prompts[:8]
        row["probe_refusal"] = [judge(t) for t in generate(model, self.study.tok, probes, 12, 8)].count("refusal") / len(probes)
        if self.peer is not None and step in (EARLY, STEPS):
            row["peer_cosine"] = self.peer.measure(model, step).get(bpeer.COSINE)
        self.seconds += time.perf_counter() - t0
        if step in EVALS:
            row.update(self.study.refusal(model, full=step == STEPS))
        self.rows.append(row)


def _kl_batch(tok, prompts):
    from rimguard.passes import encode, format_prompt, pad, pad_id

    return pad([encode(tok, format_prompt(tok, p)) for p in prompts], pad_id(tok))


def _topk(model, batch, k: int = 64):
    from rimguard.passes import next_token_logprobs, probe_mode

    with probe_mode(model):
        top = next_token_logprobs(model, batch).topk(k, dim=-1)
    return top.values, top.indices


def _kl_now(model, batch, ref) -> float:
    from rimguard.signals import metrics
    from rimguard.passes import next_token_logprobs, probe_mode

    with probe_mode(model):
        logp = next_token_logprobs(model, batch)
    return float(metrics.topk_kl(ref[0], ref[1], logp, batch.attention_mask))


def run(spec: RunSpec, study: Study) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from rim_benchmark import LossLog, make_guard_class
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    from rimguard import GuardConfig

    started = time.perf_counter()
    workdir = study.args.out / "work" / spec.name
    guard_cfg = GuardConfig(**{"mode": "monitor", "num_safety_probes": 12, "margin_probes": 8, "kl_probes": 4, "max_new_tokens": 16,
                               "max_length": 192, "probe_batch_size": 16, "probe_every": 10_000, "log_file": "rimguard.jsonl",
                               **spec.guard})
    guard = make_guard_class()(guard_cfg, atlas=study.atlas, check_steps=CHECKS)
    # baselines and refusal curve for every unguarded run; the heads preset does without the peer (measured in validity)
    full = study.args.preset in ("validity", "heads") or spec.variant == "none"
    with_peer = full and study.args.preset != "heads" and bpeer.available()[0]
    peer = bpeer.Peer(study.tok, workdir / "peer", pairs=16, batch_size=16, max_length=128) if with_peer else None
    base = Baselines(study, guard, peer, full)
    timer, losses = StepTimer(), LossLog()
    lora = LoraConfig(r=32, lora_alpha=64, use_rslora=True, target_modules="all-linear", lora_dropout=0.0,
                      task_type="CAUSAL_LM") if spec.finetune == "lora" else None
    args = SFTConfig(output_dir=str(workdir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=spec.lr,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_length=192, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, fp16=False, **no_checkpointing(), seed=spec.seed,
                     data_seed=spec.seed, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=study.model(spec.seed), args=args, train_dataset=Dataset.from_list(study.records(spec, STEPS * 4)),
                         processing_class=study.tok, callbacks=[guard, timer, base, losses], peft_config=lora)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    model = trainer.model
    final = study.final_eval(model, accuracy=study.args.preset == "prevention")
    out = {"name": spec.name, **asdict(spec), "checks": base.rows, "final": final, "train_loss": losses.losses,
           "step_times": timer.times, "frozen": guard.engine.freezer.count if guard.engine.freezer else 0,
           "seconds": {"total": time.perf_counter() - started, "baselines": base.seconds, "guard_setup": guard.setup_seconds}}
    del trainer, model, guard
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
            rec = run(spec, study)
            (runs_dir / f"{spec.name}.json").write_text(json.dumps(rec, indent=1, default=float))
            last = rec["checks"][-1]
            say(f"{spec.name}: refusal {last.get('refusal_rate', math.nan):.0%}, z {last.get('entanglement_z', math.nan):.2f}, "
                f"gsm8k loss {last.get('gsm8k_loss', math.nan):.3f}, over-refusal {rec['final'].get('over_refusal', math.nan):.0%} "
                f"[{rec['seconds']['total']:.0f}s]")
    from rimbench.study_report import analyse_and_write

    analyse_and_write(args.preset, args.out, [s.name for s in plan], HERE / "results" / args.preset)


if __name__ == "__main__":
    main()
