"""Cost of one guard check against the peer's (safety-compass), interleaved in one process.

On one model, with the same number of probe prompts ``--probes`` for both:

* ``rimguard``: the guard's check as it runs in training (the monitor's measurement in
  :meth:`rimguard.GuardEngine.check`): ``--probes`` safety probes (``check_probes``), the first
  ``margin_probes`` of them also scored for the refusal margin in the same prompt pass (responses
  and openings on the prompt's KV cache), activation passes stopping after the last tracked layer,
  and KL on ``kl_probes`` reasoning rows (both at their defaults unless given);
* ablations of the same check, each switching one more speed-up off (benchmark-only switches):
  ``no-prefix`` (the token prefix all probes share, the chat template's system turn, runs with
  every probe), ``no-prefix-no-sharing`` (and the margin's prompts run apart from the safety
  sequences), ``no-prefix-no-sharing-no-exit`` (and every activation pass runs the whole model
  and its LM head); and ``inference-mode`` (probe passes under ``torch.inference_mode`` instead
  of ``no_grad``);
* ``safety-compass``: the peer's ``measure`` (its refusal direction from ``--probes`` harmful and
  ``--probes`` harmless prompts at one layer, and its AUROC on held-out pairs).

Each round times every variant once, in turn; the table gives the median and range over rounds,
and the ratio of each variant's median to the peer's. The same check's metrics are printed per
variant so that the ablations can be seen to measure the same thing.

    python -m benchmarks.check_cost --model smollm2 --probes 24 --rounds 5 --json benchmarks/results/check_cost/smollm2-p24.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import rimguard.passes as probing
from benchmarks.overhead import load, peer_callback
from rimguard import GuardConfig, GuardEngine, NeuronAtlas
from rimguard.hooks.capture import ActivationCapture
from rimguard.probes.reasoning import problems

HERE = Path(__file__).resolve().parent

VARIANTS = ("rimguard", "no-prefix", "no-prefix-no-sharing", "no-prefix-no-sharing-no-exit", "inference-mode", "safety-compass")


@contextlib.contextmanager
def ablation(engine: GuardEngine, name: str):
    """Switch one speed-up off (or inference mode on) for the block; restore after."""
    monitor = engine.monitor
    saved = (monitor.shared_prompts, monitor.shared_responses, monitor.margin_only, monitor.plain_sequences)
    probing_fn, mode_fn, prefix_fn = ActivationCapture.probing, probing.probe_mode, probing.shared_prefix
    if name.startswith("no-prefix"):
        probing.shared_prefix = lambda model, sequences: 0
    if "no-sharing" in name:
        monitor.margin_only = monitor.shared_prompts + monitor.margin_only
        monitor.plain_sequences = monitor.safety_sequences
        monitor.shared_prompts, monitor.shared_responses = [], []
    if name.endswith("no-exit"):
        ActivationCapture.probing = lambda self, full=False, stop_early=False: probing_fn(self, full, False)
    if name == "inference-mode":
        @contextlib.contextmanager
        def inference(model):
            with probing.forked_rng(), torch.inference_mode():
                was = model.training
                model.eval()
                try:
                    yield
                finally:
                    model.train(was)
        probing.probe_mode = inference
    try:
        yield
    finally:
        monitor.shared_prompts, monitor.shared_responses, monitor.margin_only, monitor.plain_sequences = saved
        ActivationCapture.probing, probing.probe_mode, probing.shared_prefix = probing_fn, mode_fn, prefix_fn


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    p.add_argument("--probes", type=int, default=GuardConfig().monitor.check_probes,
                   help="safety probes per check for rimguard (check_probes); pairs for the peer")
    p.add_argument("--margin-probes", type=int, default=GuardConfig().monitor.margin_probes)
    p.add_argument("--kl-probes", type=int, default=GuardConfig().monitor.kl_probes)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    model, tok = load(args.model)
    share = 0.2 if args.model == "tiny" else 0.5
    config = GuardConfig(num_safety_probes=args.probes, check_probes=args.probes, margin_probes=args.margin_probes,
                         kl_probes=args.kl_probes, max_new_tokens=16, probe_batch_size=8, log_file=None, min_share=share)
    atlas = NeuronAtlas.from_config(model, tok, config)
    reasoning = [f"{q.question}" for q in problems(args.kl_probes, seed=3)]
    engine = GuardEngine(config, atlas=atlas, tokenizer=tok, task_prompts=reasoning)
    engine.setup(model, tok, inject_loss=False)
    with tempfile.TemporaryDirectory() as tmp:
        peer = peer_callback(model, tok, Path(tmp), args.probes, 50).monitor if "safety-compass" in args.variants else None
        if peer is not None:
            peer.setup()
        times: dict[str, list[float]] = {v: [] for v in args.variants}
        values: dict[str, dict] = {}
        for rnd in range(args.rounds + 1):  # round 0 warms caches and allocators up; it is not counted
            for variant in args.variants:
                start = time.perf_counter()
                if variant == "safety-compass":
                    out = {k: v for k, v in peer.measure(rnd).items() if "cosine" in k or "auroc" in k}
                else:
                    with ablation(engine, variant):
                        out = engine.monitor.measure()
                elapsed = time.perf_counter() - start
                print(f"round {rnd} {variant}: {elapsed:.2f}s", file=sys.stderr, flush=True)
                if rnd:
                    times[variant].append(elapsed)
                values[variant] = {k: round(v, 6) for k, v in out.items() if k in
                                   ("safety_drop", "ras_safe", "refusal_margin", "kl_task", "entanglement_z")} or out
    engine.teardown()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    peer_median = statistics.median(times["safety-compass"]) if "safety-compass" in times else None
    print(f"\nmodel={args.model} device={device} probes={args.probes} margin_probes={args.margin_probes} kl_probes={args.kl_probes} "
          f"rounds={args.rounds}")
    print(f"{'variant':<22}{'median s':>10}{'min s':>8}{'max s':>8}{'x peer':>8}  metrics")
    rows = {}
    for variant, ts in times.items():
        med = statistics.median(ts)
        rows[variant] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "times": ts,
                         "ratio_to_peer": med / peer_median if peer_median else None, "metrics": values[variant]}
        ratio = f"{med / peer_median:8.2f}" if peer_median else f"{'':>8}"
        print(f"{variant:<22}{med:>10.2f}{min(ts):>8.2f}{max(ts):>8.2f}{ratio}  {values[variant]}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
