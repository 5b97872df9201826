"""Step-time overhead of rimguard (and of the peer callback safety-compass, and of the baselines a
practitioner would use instead), as ratios to an unguarded run measured in the same process.

Every configuration trains the same model from the same seed on the same generated reasoning
data with TRL's SFTTrainer. A timing callback records the wall time of each optimizer step
(including any probe pass the guard or the peer runs in that step). The measured window starts
after ``--warmup`` steps, which must cover rimguard's dense early checks (steps 1, 2, 4, ... below
``probe_every``), so that the window is steady state: with ``probe_every=50`` and a 50-step
window it holds exactly one check. Configurations are interleaved and repeated; per config the
repeats' values are medians.

Two ratios to the unguarded run:

* ``amortized``: mean step time over the window (hooks, penalty and the probe checks, spread over
  ``probe_every`` steps) - the number a user's wall clock sees;
* ``per-step``: median step time (the typical step: hooks, and the anchor only if it runs every step);
* ``hot path``: mean time of the steps without a check (hooks plus a periodic anchor, averaged in).

``check s`` is the extra time of a check step (its time minus the median step), and ``check
steps`` expresses it in training steps of this configuration: the amortized ratio is about
``per-step + check steps / probe_every``, so it falls as the training batch (tokens per step)
grows.

    python -m benchmarks.overhead --model tiny --repeats 3 --peer
    python -m benchmarks.overhead --preset user --repeats 2 --json benchmarks/results/overhead/user-8x512.json

``--preset user`` is a user-like shape: SmolLM2, 8 x 512 packed GSM8K tokens per step, a check
every 50 steps. Running 50-step windows at about 25 s a step is out of reach on a CPU, so each
configuration trains ``--steps`` window steps with no check (the hot path; the window is a whole
number of anchor periods) and then one step with its check (rimguard) or measurement
(safety-compass), scheduled at that step; a check's cost is the check call itself, timed directly
(the guard's ``check``, the peer callback's step-end work), since a step's own noise (a few seconds
at this shape) would swamp a peer's check. The amortized ratio at one check per ``--probe-every`` steps is then
``(hot mean + check cost / probe_every) / unguarded hot mean`` (with ``--run-steps N``: the check cost times the
number of checks the guard's default schedule runs in an N-step run, every ``probe_every`` plus the early ones at
1, 2, 4, ..., over N).
    python -m benchmarks.overhead --model smollm2 --steps 50 --warmup 33 --repeats 1 --batch 2 --max-length 128 --probes 16 --peer

``--preset study`` is the long-horizon study's shape: the aligned SmolLM2 and the study's own atlas
(``results/study3/atlas``), batch 4 x 192 tokens of GSM8K, the guard's defaults (checks at 1, 2, 4, 8 and every
10 steps, amortized over the study's 200 steps), in the same window-plus-one-check layout. ``--modes`` can name
the study's baselines (``replay-anchor-budget``, ``replay-3pct``, ``kl-train``, ``ema``, set up as the study
runner sets them up, without the guard), so that every variant of the study is timed against the unguarded
run side by side. The anchor-budget replay's 2 extra rows per step are training rows here, longer than the
anchor's own (about 60 tokens); padded to the batch's longest row at 4 x 192 that changes little, packed at
8 x 512 it makes its ratio an upper bound.

    python -m benchmarks.overhead --preset study --repeats 2 --modes regularize replay-anchor-budget replay-3pct kl-train ema \
        --json benchmarks/results/overhead/horizon-4x192.json
    python -m benchmarks.overhead --preset study --repeats 2 --ft lora --modes regularize \
        --json benchmarks/results/overhead/horizon-4x192-lora.json
    python -m benchmarks.overhead --preset user --repeats 2 --no-peer --modes regularize replay-anchor-budget replay-3pct kl-train ema \
        --json benchmarks/results/overhead/horizon-8x512.json

(and ``--ft lora --modes regularize`` at 8 x 512 into ``horizon-8x512-lora.json``): the horizon report reads all four.
RESULTS.md §7's 8 x 512 figures are one round (``--repeats 1``; a step there takes 83-127 s on 2 CPU threads).

The peer needs ``pip install safety-compass`` (benchmark environment only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from benchmarks.rimbench import baselines
from benchmarks.rimbench.callbacks import StepTimer
from rimguard import GuardConfig, MonitorConfig, NeuronAtlas, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes import bundled
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

HERE = Path(__file__).resolve().parent


def load(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "tiny":
        return tiny_model("llama", layers=4, hidden=128, intermediate=512), tiny_tokenizer()
    from rimguard.demo.zoo import aligned_smollm2, smollm2_base

    path = aligned_smollm2() if name == "smollm2-aligned" else smollm2_base()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def peer_callback(model, tokenizer, workdir: Path, pairs: int, every: int):
    """safety-compass's callback, on a refusal concept built from our bundled probes."""
    from safety_compass.callback import SafetyCompassCallback
    from safety_compass.monitor import SafetyCompassMonitor

    harmful, harmless = bundled("harmful")[:pairs], bundled("harmless")[:pairs]
    rows = [{"system": "You are a helpful assistant.", "positive_query": h, "negative_query": s,
             "split": "val" if i % 4 == 0 else "train"} for i, (h, s) in enumerate(zip(harmful, harmless))]
    (workdir / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = model.config
    concept = {"name": "refusal", "pairing_strategy": "arditi", "contrastive_pairs_file": "pairs.jsonl",
               "best_layer": max(1, cfg.num_hidden_layers // 2), "min_auroc": 0.0}
    model_cfg = {"model_name": "bench", "num_layers": cfg.num_hidden_layers, "hidden_dim": cfg.hidden_size,
                 "extraction_batch_size": 8, "extraction_dtype": "float32", "max_seq_length": 256}
    monitor = SafetyCompassMonitor(model, tokenizer, [concept], model_cfg, base_dir=str(workdir))
    return SafetyCompassCallback(monitor, measure_every_n_steps=every, log_file=str(workdir / "peer.csv"))


# the configurations that can be timed (--modes): GuardConfig overrides; None = no guard (the study's
# baselines are set up by benchmarks.rimbench.baselines.baseline, unguarded)
CONFIGS: dict[str, dict | None] = {
    "unguarded": None,
    "monitor": {"mode": "monitor"},
    "regularize": {"mode": "regularize"},  # the default regularizer: the safety anchor (every 4 steps by default)
    "anchor-every4": {"mode": "regularize", "anchor_every": 4},
    "activation": {"mode": "regularize", "regularizer": "activation"},
    "safety-compass": None,
} | dict.fromkeys(baselines.BASELINES)


def timed(obj, name: str, sink: list[float]) -> None:
    """Time every call of ``obj.name`` into ``sink`` (seconds): the check itself, apart from the step's noise."""
    inner = getattr(obj, name)

    def call(*a, **k):
        start = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            sink.append(time.perf_counter() - start)

    setattr(obj, name, call)


def round_order(modes: list[str], repeat: int) -> list[str]:
    """The order of round ``repeat``: as given, reversed in odd rounds, so that a machine whose speed drifts
    through the run (a few % to 15% an hour here) biases the median over an even number of rounds less."""
    return modes[::-1] if repeat % 2 else list(modes)


def checks_per_step(probe_every: int, run_steps: int | None) -> float:
    """Guard checks per optimizer step: ``1 / probe_every``, or, over a run of ``run_steps`` steps, the default
    schedule's count (every ``probe_every`` steps and at 1, 2, 4, ... below it) over ``run_steps``."""
    if not run_steps:
        return 1 / probe_every
    schedule = MonitorConfig(probe_every=probe_every)
    return sum(map(schedule.is_check_step, range(1, run_steps + 1))) / run_steps


def training_records(args, count: int) -> list[dict]:
    if args.data is None:
        return reasoning_texts(count)
    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    return [{"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def run_one(args, mode: str, lora: bool, atlas: NeuronAtlas, workdir: Path) -> dict[str, float]:
    model, tok = load(args.model)
    timer = StepTimer()
    callbacks: list = []
    direct: list[float] = []  # the check's own time, each call (the guard's check, or the peer's step-end work)
    guard_cfg = GuardConfig(**{"probe_every": args.probe_every, "num_safety_probes": args.probes, "max_new_tokens": 16,
                               "probe_batch_size": 8, "log_file": None, **args.guard})
    total = args.warmup + args.steps + (1 if args.check_step else 0)
    if mode == "safety-compass":
        callbacks.append(peer_callback(model, tok, workdir, args.probes, args.check_step or args.probe_every))
        timed(callbacks[-1], "on_step_end", direct)
    setup = baselines.baseline(mode, model, SFTTrainer, args.batch)  # a baseline's trainer, batch and callbacks
    callbacks += setup.callbacks  # before the timer: the EMA update is part of the step
    cfg = SFTConfig(output_dir=str(workdir / mode), max_steps=total, per_device_train_batch_size=setup.batch,
                    learning_rate=1e-5, report_to=[], bf16=False, **no_checkpointing(), save_strategy="no",
                    use_cpu=not torch.cuda.is_available(), max_length=args.max_length, packing=args.packing, seed=0,
                    disable_tqdm=True, logging_steps=10_000)
    rows = setup.batch * total * (8 if args.packing else 1) + 8  # packing: several rows fill one 512-token sequence
    trainer = setup.trainer_cls(model=model, args=cfg, train_dataset=Dataset.from_list(training_records(args, rows)),
                                processing_class=tok, callbacks=callbacks,
                                peft_config=LoraConfig(r=16, target_modules="all-linear") if lora else None)
    if CONFIGS[mode] is not None:  # the guard knows its trainer (it logs through it), as RIMGuard.attach sets up
        schedule = (lambda step: step == args.check_step) if args.check_step else None
        guard = RIMGuard(guard_cfg, atlas=atlas, trainer=trainer, schedule=schedule, **CONFIGS[mode])
        timed(guard.engine, "check", direct)
        trainer.add_callback(guard)
    trainer.add_callback(timer)  # after the guard: a step's time includes its check
    trainer.train()
    times = list(timer.times.values())[args.warmup :]
    if args.check_step:  # a window of hot steps, then one check step
        window, check = times[:-1], times[-1]
        median = statistics.median(window)
        hot = sum(window) / len(window)
        # the check's cost: timed directly (the step-minus-median estimate carries the step's noise, a few seconds)
        cost = max(direct) if direct else 0.0
        return {"mean_s": hot + cost * checks_per_step(args.probe_every, args.run_steps), "median_s": median, "hot_mean_s": hot, "check_s": cost,
                "check_steps": cost / median, "check_step_excess_s": check - median, "times": times}
    median = statistics.median(times)
    checked = mode == "safety-compass" or CONFIGS[mode] is not None  # the unguarded run and the baselines have no check
    is_check = [checked and i % args.probe_every == 0 for i in range(args.warmup + 1, args.warmup + 1 + len(times))]
    checks = [t for t, c in zip(times, is_check) if c]
    hot = [t for t, c in zip(times, is_check) if not c]  # every step without a check: hooks, and the anchor when due
    check_extra = statistics.median(checks) - median if checks else 0.0
    return {"mean_s": sum(times) / len(times), "median_s": median, "hot_mean_s": sum(hot) / len(hot), "check_s": check_extra,
            "check_steps": check_extra / median, "times": times}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with a ``--preset``'s shape applied (an explicit ``--ft`` or ``--peer`` is kept)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2", "smollm2-aligned"], default="tiny")
    parser.add_argument("--atlas", default=None, help="a saved atlas to hook (default: identify one on the model)")
    parser.add_argument("--run-steps", type=int, default=None,
                        help="with a --preset's one-check layout: amortize the check over the default schedule of a run this long "
                             "(default: one per --probe-every)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                        help="also time safety-compass (default: only under --preset user)")
    parser.add_argument("--modes", nargs="+", choices=[m for m in CONFIGS if m not in ("unguarded", "safety-compass")],
                        default=["monitor", "regularize"], help="guard configurations and baselines timed against the unguarded run")
    parser.add_argument("--data", default=None, help="GSM8K-style JSONL (question/answer) to train on; default: generated problems")
    parser.add_argument("--ft", choices=["full", "lora", "both"], default=None,
                        help="which fine-tuning kinds to time (default: both; full under a --preset)")
    parser.add_argument("--json", default=None, help="write the raw results here")
    parser.add_argument("--preset", choices=["user", "study"], default=None,
                        help="user: SmolLM2, 8 x 512 packed tokens, check every 50, a 4-step window plus one check step; "
                             "study: the long-horizon study's SmolLM2 at 4 x 192 tokens and the guard's defaults, an 8-step window "
                             "plus one check step")
    parser.add_argument("--packing", action="store_true", help="pack the training rows into max-length sequences")
    parser.add_argument("--guard", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="GuardConfig overrides of every guarded run (YAML values), e.g. refusal_kl=false witness_tokens=0")
    args = parser.parse_args(argv)
    args.guard = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.guard)}
    shared = HERE.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if args.preset == "user":
        args.model, args.batch, args.max_length, args.packing, args.probe_every = "smollm2", 8, 512, True, 50
        args.steps, args.warmup, args.ft = 4, 1, args.ft or "full"
        args.peer = True if args.peer is None else args.peer
    if args.preset == "study":  # benchmarks.rim_study's horizon runs: the guard's defaults but its probe batch
        defaults = GuardConfig()
        args.model, args.batch, args.max_length, args.packing, args.probe_every = "smollm2-aligned", 4, 192, False, defaults.monitor.probe_every
        args.steps, args.warmup, args.ft, args.probes, args.run_steps = 8, 1, args.ft or "full", defaults.atlas.num_safety_probes, 200
        args.atlas = args.atlas or str(HERE / "results" / "study3" / "atlas")
        args.guard = {"max_new_tokens": defaults.atlas.max_new_tokens, "probe_batch_size": 16, "max_length": 192, **args.guard}
    args.ft = args.ft or "both"
    if args.preset:  # GSM8K from ../shared when present, else generated problems
        args.data = args.data or (str(shared) if shared.is_file() else None)
    if "probe_every" in args.guard:  # the schedule is the benchmark's too (its check steps, the amortization)
        args.probe_every = args.guard.pop("probe_every")
    args.check_step = args.warmup + args.steps + 1 if args.preset else None
    early = max((s for s in range(1, args.probe_every) if s & (s - 1) == 0), default=0)
    if args.check_step is None and args.warmup < early:
        parser.error(f"--warmup must be >= {early}: rimguard's early checks (1, 2, 4, ..., {early}) would fall in the window")
    return args


def main() -> None:
    args = parse_args()
    modes = ["unguarded", *args.modes] + (["safety-compass"] if args.peer else [])
    fts = {"full": [False], "lora": [True], "both": [False, True]}[args.ft]
    if args.atlas:
        atlas = NeuronAtlas.load(args.atlas)
    else:
        model, tok = load(args.model)
        share = 0.2 if args.model == "tiny" else 0.5  # a random tiny model has no consistent safety neurons
        atlas = NeuronAtlas.from_config(model, tok, GuardConfig(num_safety_probes=args.probes, max_new_tokens=16, min_share=share))
        del model
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    results: dict[str, dict[str, dict[str, float]]] = {}
    # every finished run is appended to a JSONL beside --json, and a re-run with the same --json resumes there
    partial = Path(f"{args.json}.runs.jsonl") if args.json else None
    done = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()] if partial and partial.is_file() else []
    with tempfile.TemporaryDirectory() as tmp:
        for lora in fts:
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
            for repeat in range(args.repeats):
                for mode in round_order(modes, repeat):
                    key = {"lora": lora, "repeat": repeat, "mode": mode}
                    found = [r["result"] for r in done if {k: r[k] for k in key} == key]
                    result = found[0] if found else run_one(args, mode, lora, atlas, Path(tmp))
                    if partial and not found:
                        with partial.open("a") as fh:
                            fh.write(json.dumps({**key, "result": result}) + "\n")
                        print(f"{'lora' if lora else 'full'} repeat {repeat} {mode}: hot {result['hot_mean_s']:.2f} s/step, "
                              f"check {result['check_s']:.2f} s", file=sys.stderr, flush=True)
                    runs[mode].append(result)
            results["lora" if lora else "full"] = {m: {k: statistics.median(r[k] for r in v) for k in v[0] if k != "times"}
                                                   | {"times": [r["times"] for r in v]} for m, v in runs.items()}
    if args.check_step:
        per_step = checks_per_step(args.probe_every, args.run_steps)
        print(f"\none check step after the window; amortized = (hot mean + check s x {per_step:.3f}) / unguarded hot mean")
    print(f"\nmodel={args.model} device={device} window={args.steps} steps (after {args.warmup} warm-up) "
          f"probe_every={args.probe_every} probes={args.probes} batch={args.batch} max_length={args.max_length} repeats={args.repeats}")
    print(f"{'fine-tune':<10}{'mode':<16}{'mean s/step':>12}{'amortized':>11}{'median s/step':>15}{'per-step':>10}{'hot path':>10}"
          f"{'check s':>9}{'check steps':>13}")
    for ft, per_mode in results.items():
        base = per_mode["unguarded"]
        for mode, r in per_mode.items():
            r["ratio_amortized"] = r["mean_s"] / (base["hot_mean_s"] if args.check_step else base["mean_s"])
            r["ratio_per_step"] = r["median_s"] / base["median_s"]
            r["ratio_hot"] = r["hot_mean_s"] / base["hot_mean_s"]
            print(f"{ft:<10}{mode:<16}{r['mean_s']:>12.4f}{r['ratio_amortized']:>11.3f}{r['median_s']:>15.4f}"
                  f"{r['ratio_per_step']:>10.3f}{r['ratio_hot']:>10.3f}{r['check_s']:>9.2f}{r['check_steps']:>13.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device, "results": results}, indent=1))


if __name__ == "__main__":
    main()
