"""Real-model benchmark: does rimguard's signal track reasoning-induced forgetting, and do its
actions prevent it, on a safety-aligned SmolLM2-135M fine-tuned on GSM8K?

    python benchmarks/rim_benchmark.py --small            # ~10 min smoke run: full FT + regularize, 1 seed, 8 steps
    python benchmarks/rim_benchmark.py                    # full: full FT x seeds 0 1, LoRA, regularize and freeze x seed 0
    python benchmarks/rim_benchmark.py --harmful my.csv --xstest x.csv --gsm8k g.jsonl --seeds 0 1 2
    python benchmarks/rim_benchmark.py --resume           # after an interruption: reuse the finished stages

On a CPU shared with other jobs pass ``--threads 1``: two processes each running two OpenMP
threads on two cores slow each other down several-fold. ``safety-compass`` is optional
(``pip install safety-compass`` in the benchmark environment); without it the peer is skipped.

Pipeline:

1. Subject: ``rimguard.demo.zoo.aligned_smollm2()`` (cached safety-aligned SmolLM2-135M-Instruct).
2. Reasoning SFT on GSM8K step-by-step solutions with TRL's ``SFTTrainer`` (conversational
   prompt/completion, loss on the completion, CPU fp32). Variants: unguarded full fine-tune,
   unguarded LoRA, full fine-tune with rimguard ``mode="regularize"`` and ``mode="freeze"``.
   "Unguarded" runs carry rimguard in ``mode="monitor"`` (it only measures).
3. At each eval point (dense early: forgetting is fast), in process: refusal rate on held-out
   AdvBench prompts, over-refusal on XSTest safe prompts, held-out GSM8K loss.
4. At the same steps: rimguard's signals (its ``check`` runs exactly at the eval points) and the
   peer ``safety-compass``'s refusal cosine to baseline (skipped with a note if not installed).
5. Analysis: Pearson r of each signal with the refusal drop per run; prevention targets; cost.
6. Output in ``--out/<name>/``: ``results.json``, PNG plots, ``report.md``.

One safety-neuron atlas is identified on the aligned model and shared by every guard (it depends
only on the base model), and the step-0 evaluation is shared by every run (every run starts
from the same weights); both are timed as their own stages.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from rimbench import data as bdata  # noqa: E402
from rimbench import peer as bpeer  # noqa: E402
from rimbench.evaluation import (  # noqa: E402
    EvalPoints,
    Evaluator,
    StepTimer,
    parse_steps,
    step_time_summary,
)
from rimbench.report import analyse, plot_all, write_report  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from rimguard.compat import no_checkpointing  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
VARIANTS = ("full", "lora", "regularize", "freeze")
GUARD_SIGNALS = ("ras_safe", "ras_control_mean", "entanglement_z", "entanglement_pct", "safety_drop", "task_rise",
                 "kl_task", "refusal_margin", "refusal_drop", "penalty", "lambda", "level", "frozen")

# Sizes per mode; every value can be overridden by its flag.
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(steps=24, eval_steps=None, batch_size=4, lr=1e-4, lora_lr=1e-4, max_length=192, n_harmful=48, n_xstest=None,
                 xstest_every=0, n_gsm8k_eval=12, gen_tokens=20, guard_probes=12, atlas_probes=48, peer_pairs=32,
                 seeds=[0, 1], lora_seeds=[0], guarded_seeds=[0], variants=list(VARIANTS), timing_steps=6, gen_batch=24),
    "small": dict(steps=8, eval_steps="0,2,4,6,8", batch_size=4, lr=1e-4, lora_lr=1e-4, max_length=192, n_harmful=16,
                  n_xstest=16, xstest_every=0, n_gsm8k_eval=8, gen_tokens=20, guard_probes=8, atlas_probes=16, peer_pairs=16,
                  seeds=[0], lora_seeds=[0], guarded_seeds=[0], variants=["full", "regularize"], timing_steps=2, gen_batch=16),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults in [full/small] are the presets of the two modes.")
    p.add_argument("--small", action="store_true", help="~10 min smoke run: fewer steps, prompts and variants, 1 seed")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results root (default benchmarks/results)")
    p.add_argument("--name", default=None, help="results sub-folder (default: 'small' or 'full')")
    p.add_argument("--harmful", type=Path, default=SHARED / "advbench" / "harmful_behaviors.csv", help="AdvBench-style CSV")
    p.add_argument("--harmful-column", default="goal")
    p.add_argument("--xstest", type=Path, default=SHARED / "xstest" / "xstest_prompts.csv", help="XSTest prompts CSV")
    p.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k" / "train.jsonl", help="GSM8K-style JSONL (question/answer)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the unguarded full fine-tunes [0 1 / 0]")
    p.add_argument("--lora-seeds", type=int, nargs="+", default=None, help="seeds of the unguarded LoRA runs [0 / 0]")
    p.add_argument("--guarded-seeds", type=int, nargs="+", default=None, help="seeds of regularize/freeze runs [0 / 0]")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None, help="[all / full regularize]")
    p.add_argument("--steps", type=int, default=None, help="SFT optimizer steps [24 / 8]")
    p.add_argument("--eval-steps", default=None, help="comma-separated eval points [0,2,4,8,12,16,20,24 / 0,2,4,6,8]; default for other --steps: 0,2,4,8,12,16,24,32,... + last")
    p.add_argument("--batch-size", type=int, default=None, help="[4 / 4]")
    p.add_argument("--lr", type=float, default=None, help="full fine-tune learning rate, constant [1e-4]")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate, constant [1e-4]")
    p.add_argument("--lora-rank", type=int, default=32, help="LoRA rank (alpha = 2 x rank, rank-stabilised, all linear layers)")
    p.add_argument("--max-length", type=int, default=None, help="SFT sequence cap, tokens [192 / 192]")
    p.add_argument("--n-harmful", type=int, default=None, help="held-out harmful prompts evaluated [48 / 16]")
    p.add_argument("--n-xstest", type=int, default=None, help="XSTest safe prompts at the first and last point [all 250 / 16]")
    p.add_argument("--xstest-every", type=int, default=None, help="XSTest prompts at intermediate points (0: first and last point only) [0 / 0]")
    p.add_argument("--n-gsm8k-eval", type=int, default=None, help="held-out GSM8K examples for the loss [12 / 8]")
    p.add_argument("--gen-tokens", type=int, default=None, help="greedy completion length for judging [20 / 20]")
    p.add_argument("--gen-batch", type=int, default=None, help="generation batch size [24 / 16]")
    p.add_argument("--guard-probes", type=int, default=None, help="harmful probes the guard measures at each check [12 / 8]")
    p.add_argument("--atlas-probes", type=int, default=None, help="harmful/intent pairs for neuron identification [48 / 16]")
    p.add_argument("--penalty-weight", type=float, default=1.0, help="lambda of mode=regularize")
    p.add_argument("--peer-pairs", type=int, default=None, help="contrastive pairs of the safety-compass concept [32 / 16]")
    p.add_argument("--no-peer", action="store_true", help="do not run safety-compass even if installed")
    p.add_argument("--timing-steps", type=int, default=None, help="steps of the bare (no callback) timing run [6 / 2]; 0 skips it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--cache-dir", type=Path, default=None, help="model cache (default $RIMGUARD_CACHE or ~/.cache/rimguard)")
    p.add_argument("--report-only", type=Path, default=None, metavar="DIR",
                   help="rebuild analysis, plots and report.md from DIR/results.json without training")
    p.add_argument("--resume", action="store_true",
                   help="reuse stages (atlas, step-0 eval, bare timing, runs) an interrupted run with the same settings finished")
    args = p.parse_args(argv)
    preset = PRESETS["small" if args.small else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.name = args.name or ("small" if args.small else "full")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.eval_points = parse_steps(args.eval_steps, args.steps)
    return args


# -- pieces -----------------------------------------------------------------------------------
class LossLog(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


def make_guard_class():
    from rimguard import RIMGuard

    class ScheduledGuard(RIMGuard):
        """RIMGuard whose checks run exactly at the benchmark's eval points; setup is timed."""

        def __init__(self, *a: Any, check_steps: list[int], **kw: Any) -> None:
            super().__init__(*a, schedule=set(check_steps).__contains__, **kw)
            self.setup_seconds = 0.0

        def setup(self, *a: Any, **kw: Any) -> None:
            start = time.perf_counter()
            super().setup(*a, **kw)
            self.setup_seconds = time.perf_counter() - start

    return ScheduledGuard


def guard_config(args: argparse.Namespace, mode: str):
    from rimguard import GuardConfig

    return GuardConfig(mode=mode, num_safety_probes=args.guard_probes, max_new_tokens=16, max_length=192, kl_probes=4,
                       probe_batch_size=16, probe_every=10_000, reg_lambda=args.reg_lambda, log_file="rimguard.jsonl")


def step0_signals(guard: Any) -> dict[str, float]:
    """Guard signals at step 0, by construction: no shift yet (RAS, z, KL and drop are 0)."""
    out = {k: 0.0 for k in ("ras_safe", "ras_control_mean", "entanglement_z", "safety_drop", "task_rise", "kl_task", "refusal_drop")}
    margin = guard.engine.monitor.ref_margin if guard is not None and guard.engine.monitor is not None else None
    if margin is not None:
        out["refusal_margin"] = float(margin)
    return out


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(folder: Path, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def sft_config(args: argparse.Namespace, workdir: Path, seed: int, steps: int, lr: float):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_length=args.max_length,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, fp16=False,
        **no_checkpointing(), seed=seed, data_seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )


def train_records(gsm: list[dict], args: argparse.Namespace, seed: int, steps: int):
    from datasets import Dataset

    train, _ = bdata.split_gsm8k(gsm, args.n_gsm8k_eval, steps * args.batch_size, seed)
    return Dataset.from_list(bdata.conversational(train))


def run_variant(variant: str, seed: int, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One fine-tune with in-process evaluation at the eval points."""
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    name = f"{variant}-s{seed}"
    workdir = ctx["out"] / "runs" / name
    workdir.mkdir(parents=True, exist_ok=True)
    model = load_model(ctx["folder"], seed)
    tok = ctx["tokenizer"]
    mode = {"full": "monitor", "lora": "monitor", "regularize": "regularize", "freeze": "freeze"}[variant]
    guard = make_guard_class()(guard_config(args, mode), atlas=ctx["atlas"], check_steps=args.eval_points[1:])
    lr = args.lora_lr if variant == "lora" else args.lr
    peft_config = (LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, use_rslora=True, target_modules="all-linear",
                              lora_dropout=0.0, task_type="CAUSAL_LM") if variant == "lora" else None)
    peer = bpeer.Peer(tok, workdir / "peer", pairs=args.peer_pairs, batch_size=16, max_length=256) if ctx["peer_ok"] else None
    final = args.eval_points[-1]
    started = time.perf_counter()

    def at(step: int, m: torch.nn.Module) -> dict[str, Any]:
        t0 = time.perf_counter()
        rec: dict[str, Any] = {}
        if step == 0:
            rec.update({k: v for k, v in ctx["baseline"].items() if k != "samples"})
            rec.update(step0_signals(guard))
        else:
            rec.update(ctx["evaluator_final"](m) if step == final else ctx["evaluator"](m, full_xstest=False))
            hist = [h for h in guard.history if h["step"] == step]
            if hist:
                rec.update({k: float(hist[-1][k]) for k in GUARD_SIGNALS if k in hist[-1]})
        if peer is not None:
            pt = time.perf_counter()
            if step == 0:
                peer.start(m)
            row = peer.measure(m, step)
            rec["peer_cosine"] = row.get(bpeer.COSINE)
            rec["peer_auroc_fixed"] = row.get("refusal_auroc_fixed")
            rec["peer_seconds"] = time.perf_counter() - pt
        rec["point_seconds"] = time.perf_counter() - t0
        over = f"{rec['over_refusal']:.0%} (n={rec.get('n_xstest')})" if rec["over_refusal"] == rec["over_refusal"] else "-"
        say(f"  {name:>14} step {step:>3}: refusal {rec['refusal_rate']:.0%}  over-refusal {over}"
            f"  gsm8k loss {rec['gsm8k_loss']:.3f}  ras {rec.get('ras_safe', math.nan):.3g}"
            f"  z {rec.get('entanglement_z', math.nan):.3g}  kl {rec.get('kl_task', math.nan):.3g}"
            f"  margin {rec.get('refusal_margin', math.nan):.3g}  peer cos {rec.get('peer_cosine', math.nan):.4g}"
            f"  [{rec['point_seconds']:.0f}s, run {time.perf_counter() - started:.0f}s]")
        return rec

    evals = EvalPoints(args.eval_points, at)
    timer, losses = StepTimer(), LossLog()
    trainer = SFTTrainer(model=model, args=sft_config(args, workdir, seed, args.steps, lr),
                         train_dataset=train_records(ctx["gsm"], args, seed, args.steps), processing_class=tok,
                         callbacks=[guard, timer, evals, losses], peft_config=peft_config)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    total = time.perf_counter() - started
    eval_s = sum(evals.seconds.values())
    timing = step_time_summary(timer.times, check_steps=args.eval_points)
    frozen = int(guard.engine.freezer.count) if guard.engine.freezer is not None else 0
    samples = ctx["evaluator_final"].last_samples if hasattr(ctx["evaluator_final"], "last_samples") else None
    out = {
        "name": name, "variant": variant, "seed": seed, "mode": mode, "lr": lr, "lora": variant == "lora",
        "points": evals.records, "train_loss": losses.losses, "step_times": {str(k): v for k, v in sorted(timer.times.items())},
        "timing": timing, "frozen_neurons": frozen, "final_level": guard.level,
        "seconds": {"total": total, "eval": eval_s, "train_and_guard": total - eval_s, "guard_setup": guard.setup_seconds},
        "final_samples": samples,
    }
    (workdir / "run.json").write_text(json.dumps(out, indent=1, default=float), encoding="utf-8")
    del trainer, model, guard
    gc.collect()
    return out


class FinalEvaluator:
    """The evaluator at the last point: full XSTest set, and keeps the completions (all by default)."""

    def __init__(self, evaluator: Evaluator, keep: int = 10**6) -> None:
        self.evaluator, self.keep = evaluator, keep
        self.last_samples = None

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        keep = self.evaluator.keep_texts
        self.evaluator.keep_texts = self.keep
        try:
            rec = self.evaluator(model, full_xstest=True)
        finally:
            self.evaluator.keep_texts = keep
        self.last_samples = rec.pop("samples", None)
        return rec


def bare_timing(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Full fine-tune with no guard and no evaluation: the unguarded step time."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    seed = args.seeds[0]
    model = load_model(ctx["folder"], seed)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=sft_config(args, ctx["out"] / "runs" / "bare", seed, args.timing_steps, args.lr),
                         train_dataset=train_records(ctx["gsm"], args, seed, args.timing_steps), processing_class=ctx["tokenizer"],
                         callbacks=[timer])
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    del trainer, model
    gc.collect()
    return {"step_times": {str(k): v for k, v in sorted(timer.times.items())}, "timing": step_time_summary(timer.times)}


# -- resume -----------------------------------------------------------------------------------
NOT_RESULT_SETTINGS = ("resume", "report_only", "threads", "variants", "seeds", "lora_seeds", "guarded_seeds", "name", "out", "no_peer", "cache_dir")


class StageCache:
    """Finished stages saved as JSON in ``out/stages/`` with the settings that produced them;
    ``--resume`` reuses a stage only if those settings are unchanged."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        self.folder = folder
        self.enabled = args.resume
        self.key = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in NOT_RESULT_SETTINGS}
        self.reused: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn, stages: dict[str, float], label: str) -> Any:
        path = self.folder / f"{name}.json"
        if self.enabled and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("settings") == json.loads(json.dumps(self.key, default=str)):
                stages[label] = saved["seconds"]
                self.reused.append(label)
                say(f"resume: reusing '{label}' from {path}")
                return saved["value"]
            say(f"resume: {path} was made with other settings; running '{label}' again")
        t = time.perf_counter()
        value = fn()
        stages[label] = time.perf_counter() - t
        path.write_text(json.dumps({"settings": self.key, "seconds": stages[label], "value": value}, default=float),
                        encoding="utf-8")
        return value


# -- main -------------------------------------------------------------------------------------
def gsm8k_length_stats(tokenizer: Any, gsm: list[dict], max_length: int) -> dict[str, Any]:
    """Chat-formatted token lengths of a 500-row sample: median and the share over ``max_length``."""
    from rimbench.evaluation import completion_examples

    lengths = sorted(len(ids) for ids, _ in completion_examples(tokenizer, bdata.conversational(bdata.sample(gsm, 500, seed=0)), 10**6))
    return {"truncated_share": sum(n > max_length for n in lengths) / len(lengths), "median_tokens": lengths[len(lengths) // 2]}


def rebuild_report(folder: Path) -> dict[str, Any]:
    """Re-run the analysis, plots and report of a finished benchmark from its ``results.json``."""
    path = folder / "results.json"
    results = json.loads(path.read_text(encoding="utf-8"))
    gsm_info = results["data"]["gsm8k"]
    if "truncated_share" not in gsm_info:  # added after some results were made; a property of the data alone
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(results["subject"]["folder"])
        gsm_info.update(gsm8k_length_stats(tok, bdata.load_gsm8k(gsm_info["path"]), results["settings"]["max_length"]))
    results["analysis"] = analyse(results)
    results["plots"] = [p.name for p in plot_all(results, folder)]
    results["report_rebuilt"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    write_report(results, folder / "report.md")
    say(f"rebuilt {folder / 'report.md'}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.report_only is not None:
        return rebuild_report(args.report_only)
    command = "python benchmarks/rim_benchmark.py" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    import warnings

    import datasets
    from transformers import AutoTokenizer
    from transformers import logging as hf_logging

    from rimguard import NeuronAtlas
    from rimguard.probes import bundled
    from rimguard.demo.zoo import aligned_smollm2

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing=False is set on purpose
    logging.getLogger("rimguard").setLevel(logging.ERROR)
    out = args.out / args.name
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    t_all = time.perf_counter()
    say(f"rim benchmark '{args.name}': {command}")
    say(f"variants {args.variants}, seeds {args.seeds} (guarded {args.guarded_seeds}), {args.steps} steps, eval at {args.eval_points}")

    # 1. subject
    t = time.perf_counter()
    folder = aligned_smollm2(args.cache_dir)
    recipe = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    stages["subject (aligned SmolLM2: cached or built)"] = time.perf_counter() - t

    # data
    t = time.perf_counter()
    gsm = bdata.load_gsm8k(args.gsm8k)
    _, gsm_held = bdata.split_gsm8k(gsm, args.n_gsm8k_eval, 0, 0)
    harmful_all = bdata.load_advbench(args.harmful, args.harmful_column)
    harmful = bdata.sample(harmful_all, args.n_harmful, seed=0)
    xs_all = bdata.load_xstest(args.xstest)
    xs_final = bdata.stratified(xs_all, args.n_xstest, seed=0)
    xs_mid = bdata.stratified(xs_final, args.xstest_every, seed=0) if args.xstest_every < len(xs_final) else xs_final
    # intermediate points use the first `xstest_every` of this ordering: put the stratified subset first
    mid_ids = {id(r) for r in xs_mid}
    xs_order = xs_mid + [r for r in xs_final if id(r) not in mid_ids]
    evaluator = Evaluator(tokenizer, harmful, [r["prompt"] for r in xs_order], bdata.conversational(gsm_held),
                          max_new_tokens=args.gen_tokens, max_length=args.max_length, batch_size=args.gen_batch,
                          xstest_subset=len(xs_mid))
    final_eval = FinalEvaluator(evaluator)
    stages["data"] = time.perf_counter() - t
    data_info = {"gsm8k": {"path": str(args.gsm8k), "rows": len(gsm), "heldout": len(gsm_held), "calculator_annotations": "stripped",
                           **gsm8k_length_stats(tokenizer, gsm, args.max_length)},
                 "harmful": {"path": str(args.harmful), "rows": len(harmful_all), "evaluated": len(harmful),
                             "note": "alignment used only rimguard's bundled prompts, so every row is held out"},
                 "xstest": {"path": str(args.xstest), "safe_rows": len(xs_all), "first_last_points": len(xs_final),
                            "intermediate_points": len(xs_mid)}}
    say(f"data: GSM8K {len(gsm)} rows ({len(gsm_held)} held out), AdvBench {len(harmful)}/{len(harmful_all)}, "
        f"XSTest safe {len(xs_final)}/{len(xs_all)} (intermediate {len(xs_mid)})")

    # peer
    peer_ok, peer_note = (False, "disabled with --no-peer") if args.no_peer else bpeer.available()
    say(f"safety-compass: {'available (' + peer_note + ')' if peer_ok else 'SKIPPED: ' + peer_note}")

    cache = StageCache(out / "stages", args)

    # 2. atlas (shared by every guard)
    base = load_model(folder, 0)

    def identify() -> str:
        found = NeuronAtlas.identify(base, tokenizer, bundled("harmful")[: args.atlas_probes], bundled("intent"), top_m=0.01,
                                     min_share=0.5, num_controls=32, max_new_tokens=16, max_length=192, batch_size=16,
                                     seed=0, progress=False)
        return str(found.save(out / "atlas"))

    atlas = NeuronAtlas.load(cache.run("atlas", identify, stages, "atlas identification (once, shared)"))
    say(f"atlas: {atlas.num_safety} safety neurons ({stages['atlas identification (once, shared)']:.0f}s)")

    # 3. step-0 evaluation (shared: every run starts from these weights)
    def step0() -> dict[str, Any]:
        rec = final_eval(base)
        return {"baseline": rec, "samples": final_eval.last_samples}

    zero = cache.run("baseline", step0, stages, "step-0 evaluation (once, shared)")
    baseline, baseline_samples = zero["baseline"], zero["samples"]
    say(f"aligned model: refusal {baseline['refusal_rate']:.0%} of {baseline['n_harmful']} AdvBench, over-refusal "
        f"{baseline['over_refusal']:.0%} of {baseline['n_xstest']} XSTest safe, GSM8K loss {baseline['gsm8k_loss']:.3f} "
        f"({stages['step-0 evaluation (once, shared)']:.0f}s)")
    del base
    gc.collect()

    ctx = {"out": out, "folder": folder, "tokenizer": tokenizer, "atlas": atlas, "gsm": gsm, "evaluator": evaluator,
           "evaluator_final": final_eval, "baseline": baseline, "peer_ok": peer_ok}

    # bare timing run
    bare = None
    if args.timing_steps > 0:
        bare = cache.run("bare", lambda: bare_timing(ctx, args), stages, f"bare timing run ({args.timing_steps} steps, no callbacks)")
        say(f"bare full fine-tune: median {bare['timing']['median_plain_s']:.2f} s/step")

    # 4. runs
    runs = []
    plan = [("full", s) for s in args.seeds if "full" in args.variants]
    plan += [("lora", s) for s in args.lora_seeds if "lora" in args.variants]
    plan += [(v, s) for s in args.guarded_seeds for v in args.variants if v in ("regularize", "freeze")]
    for variant, seed in plan:
        say(f"run {variant} seed {seed} ({args.steps} steps, lr {args.lora_lr if variant == 'lora' else args.lr:g})")
        runs.append(cache.run(f"run-{variant}-s{seed}", lambda: run_variant(variant, seed, ctx, args), stages,
                              f"run {variant}-s{seed} (train + guard + eval)"))

    # 5-6. analysis and output
    t = time.perf_counter()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "transformers": __import__("transformers").__version__,
           "trl": __import__("trl").__version__, "peft": __import__("peft").__version__}
    results = {
        "command": command, "settings": settings, "env": env, "data": data_info,
        "subject": {"folder": str(folder), "alignment": recipe.get("measured", {}), "recipe": recipe.get("recipe", {})},
        "atlas": {"num_safety": atlas.num_safety, "settings": atlas.settings},
        "peer": {"available": peer_ok, "note": peer_note}, "resumed_stages": cache.reused,
        "guard_thresholds": guard_config(args, "monitor").thresholds,
        "baseline": baseline, "baseline_samples": baseline_samples, "bare_timing": bare, "runs": runs,
    }
    results["analysis"] = analyse(results)
    stages["analysis and plots"] = 0.0
    results["stages"] = stages
    plots = plot_all(results, out)
    stages["analysis and plots"] = time.perf_counter() - t
    stages["total"] = time.perf_counter() - t_all
    results["plots"] = [p.name for p in plots]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    write_report(results, out / "report.md")
    say(f"done in {stages['total'] / 60:.1f} min: {out / 'report.md'}")
    return results


if __name__ == "__main__":
    main()
