"""How many probes a check needs: each metric's check-to-check noise against the number of probes.

On the aligned SmolLM2 (the benchmark subject), a short reasoning SFT (generated word problems,
the README demo's settings) drifts the model; at a few of its steps, every probe of a pool is
measured once:

* per safety probe (the 96 bundled harmful prompts with the base model's 16-token greedy
  responses, the atlas identified on the first 48): the tracked neurons' max activations, and
  the refusal margin (refusal minus compliance openings, nats);
* per KL probe (32 generated word problems): KL(pi_0 || pi_t) on the top-64 tail partition.

A check with ``c`` probes is then simulated by drawing ``c`` probes of the pool with replacement
(``--draws`` times) and computing the metric exactly as the monitor does (the same probes give the
reference and the current value). The spread (standard deviation) of a metric over draws is its
noise at ``c`` probes: the part of a check-to-check change that comes from which prompts were
probed, not from training. The reasoning side of RAS is held fixed (in training it is streamed
from the batches, not probed).

Rule (docs/guide.md): take the smallest count whose noise is at most ``--fraction`` (default
10%) of the metric's alarm level, at the measured step nearest that level. The alarm level of
``safety_drop`` is its default warn threshold (0.5); the refusal margin and KL have no default
alarm (they are witnesses), so theirs is their own value at the step where ``safety_drop`` is
nearest its threshold.

    python -m benchmarks.probe_noise --out benchmarks/results/probe_noise
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

COUNTS = (4, 8, 12, 16, 24, 32, 48, 64)
ALARM = ("safety_drop", 0.5)  # the default warn threshold
WITNESSES = ("refusal_drop", "kl_task")  # no default alarm: compared with their value when safety_drop alarms


def measure(model, tok, atlas, monitor_capture, probes, responses, reasoning, openings, n_refusal, kl_ref=None):
    """Per-probe measurements of ``model``: ``acts`` [P, N], ``margins`` [P], ``task`` [N] and KL per reasoning row."""
    from rimguard.passes import Batch, activations, next_token_logprobs, pad, pad_id, probe_mode, prompt_ids, prompt_pass, tokenize_dialogues
    from rimguard.signals import metrics

    seqs = tokenize_dialogues(tok, probes, responses, 192)
    acts = activations(model, monitor_capture, seqs, pad_id(tok), 16)
    heads = prompt_ids(model, tok, probes, max(len(c) for c in openings), 192)
    margins = metrics.refusal_margin(prompt_pass(model, heads, openings, pad_id(tok), 16).scores, n_refusal)
    rseqs = tokenize_dialogues(tok, reasoning, None, 192)
    task = activations(model, monitor_capture, rseqs, pad_id(tok), 16).mean(0)
    batch = pad(rseqs, pad_id(tok))
    with probe_mode(model):
        logps = [next_token_logprobs(model, Batch(batch.input_ids[r : r + 1], batch.attention_mask[r : r + 1])) for r in range(len(rseqs))]
    if kl_ref is None:
        kl_ref = [lp.topk(64, dim=-1) for lp in logps]
        kl = torch.zeros(len(rseqs))
    else:
        kl = torch.tensor([metrics.topk_kl(ref.values, ref.indices, lp, batch.attention_mask[r : r + 1]).item()
                           for r, (ref, lp) in enumerate(zip(kl_ref, logps))])
    return {"acts": acts.cpu(), "margins": margins.cpu(), "task": task.cpu(), "kl": kl}, kl_ref


def simulate(base: dict, now: dict, atlas, counts, draws: int, seed: int = 0) -> dict[str, dict[int, dict[str, float]]]:
    """Per metric and probe count: mean and standard deviation over ``draws`` resampled checks."""
    from rimguard.signals import metrics

    gen = torch.Generator().manual_seed(seed)
    sets = torch.cat([atlas.safety[None], atlas.controls])
    out: dict[str, dict[int, dict[str, float]]] = {"safety_drop": {}, "entanglement_z": {}, "refusal_drop": {}, "kl_task": {}}
    n_probes, n_kl = base["acts"].shape[0], now["kl"].shape[0]
    for c in counts:
        rows = {k: [] for k in out}
        for _ in range(draws):
            pick = torch.randint(n_probes, (c,), generator=gen)
            ref, cur = base["acts"][pick].mean(0), now["acts"][pick].mean(0)
            per_set = metrics.ras(ref[sets], cur[sets], base["task"][sets], now["task"][sets])
            rows["safety_drop"].append(per_set["safety_drop"][0].item())
            rows["entanglement_z"].append(metrics.null_score(per_set["ras"][0], per_set["ras"][1:])["z"].item())
            rows["refusal_drop"].append((base["margins"][pick].mean() - now["margins"][pick].mean()).item())
            rows["kl_task"].append(now["kl"][torch.randint(n_kl, (min(c, n_kl),), generator=gen)].mean().item())
        for k, v in rows.items():
            t = torch.tensor(v)
            out[k][c] = {"mean": t.mean().item(), "std": t.std().item()}
    return out


def smallest_count(noise: dict[int, dict[str, float]], level: float, fraction: float) -> int | None:
    """The smallest probe count whose noise (std) is at most ``fraction * level``."""
    ok = [c for c, v in sorted(noise.items()) if v["std"] <= fraction * abs(level)]
    return ok[0] if ok else None


def rules(results: dict, fraction: float) -> dict[str, dict]:
    """Per metric: its alarm level and the smallest count meeting the rule, at the point where
    ``safety_drop`` (measured with every probe) reaches its threshold. Noise and witness levels there
    are interpolated linearly in ``safety_drop`` between the two measured steps around it."""
    metric, threshold = ALARM
    top = max(COUNTS)
    steps = sorted(results)
    value = {s: results[s][metric][top]["mean"] for s in steps}
    below = [s for s in steps if value[s] <= threshold] or steps[:1]
    above = [s for s in steps if value[s] >= threshold] or steps[-1:]
    lo, hi = below[-1], above[0]
    w = 0.0 if hi == lo else (threshold - value[lo]) / (value[hi] - value[lo])

    def at(name: str, count: int, stat: str) -> float:
        return (1 - w) * results[lo][name][count][stat] + w * results[hi][name][count][stat]

    out = {}
    for name in (metric, *WITNESSES):
        level = threshold if name == metric else at(name, top, "mean")
        noise = {c: {"std": at(name, c, "std")} for c in COUNTS}
        out[name] = {"level": level, "between_steps": [lo, hi], "weight": w, "noise": noise,
                     "count": smallest_count(noise, level, fraction)}
    return out


def plot(results: dict, chosen: dict, dest: Path, fraction: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 3.6))
    for ax, (metric, rule) in zip(axes, chosen.items()):
        for step, per_metric in sorted(results.items()):
            noise = per_metric[metric]
            counts = sorted(noise)
            ax.plot(counts, [noise[c]["std"] for c in counts], marker="o",
                    label=f"step {step} (value {noise[counts[-1]]['mean']:.2f})")
        counts = sorted(rule["noise"])
        ax.plot(counts, [rule["noise"][c]["std"] for c in counts], color="black", ls=":", marker="x",
                label=f"at the alarm (between steps {rule['between_steps'][0]} and {rule['between_steps'][1]})")
        ax.axhline(fraction * abs(rule["level"]), color="red", ls="--", lw=1,
                   label=f"{fraction:.0%} of {rule['level']:.2f}: {rule['count']} probes")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("probes per check" if metric != "kl_task" else "KL probes per check")
        ax.set_ylabel("std over resampled checks")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.suptitle("Check-to-check noise from the choice of probes (aligned SmolLM2, reasoning SFT)", fontsize=10)
    fig.tight_layout()
    path = dest / "probe_noise.png"
    fig.savefig(path, dpi=120)
    return path


def write(record: dict, dest: Path) -> None:
    """Rules, JSON and plot from measured results (``record["results"]``: step -> metric -> count -> stats)."""
    results = {int(step): {m: {int(c): v for c, v in per.items()} for m, per in metrics_.items()}
               for step, metrics_ in record["results"].items()}
    record["rules"] = rules(results, record["fraction"])
    (dest / "probe_noise.json").write_text(json.dumps(record, indent=1))
    png = plot(results, record["rules"], dest, record["fraction"])
    print(json.dumps(record["rules"], indent=1))
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "results" / "probe_noise")
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 12], help="SFT steps at which the pool is measured")
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--analyse", action="store_true", help="only re-derive the rules and the plot from OUT/probe_noise.json")
    args = p.parse_args(argv)
    if args.analyse:
        record = json.loads((args.out / "probe_noise.json").read_text())
        record["fraction"] = args.fraction
        write(record, args.out)
        return

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rimguard import GuardConfig, NeuronAtlas
    from rimguard.compat import no_checkpointing
    from rimguard.demo.zoo import aligned_smollm2
    from rimguard.hooks.arch import find_mlp_layers
    from rimguard.hooks.capture import ActivationCapture
    from rimguard.probes import bundled
    from rimguard.probes.reasoning import problems, reasoning_texts

    args.out.mkdir(parents=True, exist_ok=True)
    folder = aligned_smollm2()
    tok = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    atlas_dir = args.out / "atlas"
    if not (atlas_dir / "atlas.json").is_file():
        NeuronAtlas.from_config(model, tok, GuardConfig(num_safety_probes=len(bundled("harmful")), top_m=0.01, min_share=0.5,
                                                        num_controls=32, max_new_tokens=16, max_length=192,
                                                        probe_batch_size=16)).save(atlas_dir)
    atlas = NeuronAtlas.load(atlas_dir)
    capture = ActivationCapture(model, find_mlp_layers(model), [t for t in atlas.per_layer()]).attach()
    openings = [list(tok(o, add_special_tokens=False)["input_ids"]) for o in bundled("refusal_openings") + bundled("compliance_openings")]
    n_refusal = len(bundled("refusal_openings"))
    reasoning = [q.question for q in problems(32, seed=7)]
    pool = (atlas.probe_prompts, atlas.probe_responses)
    base, kl_ref = measure(model, tok, atlas, capture, *pool, reasoning, openings, n_refusal)
    results: dict[int, dict] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step in args.steps:
                now, _ = measure(model, tok, atlas, capture, *pool, reasoning, openings, n_refusal, kl_ref)
                results[state.global_step] = simulate(base, now, atlas, COUNTS, args.draws)
                print(f"step {state.global_step}: " + ", ".join(f"{m} {v[64]['mean']:.3f} (std@16 {v[16]['std']:.3f})"
                                                               for m, v in results[state.global_step].items()), file=sys.stderr)

    cfg = SFTConfig(output_dir=str(args.out / "sft"), max_steps=max(args.steps), per_device_train_batch_size=4, learning_rate=2e-4,
                    warmup_steps=3, report_to=[], bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=True,
                    max_length=192, seed=0, disable_tqdm=True, logging_steps=10_000)
    # the capture stays attached: training forwards stream into it (never read here), probe passes read it
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(reasoning_texts(4 * max(args.steps), seed=5)),
                         processing_class=tok, callbacks=[Snapshot()])
    trainer.train()
    record = {"counts": COUNTS, "draws": args.draws, "fraction": args.fraction, "alarm": ALARM, "pool": len(pool[0]),
              "kl_pool": len(reasoning), "results": results}
    write(record, args.out)


if __name__ == "__main__":
    main()
