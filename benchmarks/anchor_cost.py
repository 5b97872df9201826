"""The safety anchor's cost against its batch size and schedule (issue #14).

One anchor pass is a forward with gradient and a backward over ``anchor_batch_size`` rows of the
anchor record (a bundled prompt plus the base model's own response). This script times that pass on
the aligned SmolLM2 for each batch size, and a plain training step (forward, backward, AdamW) at the
prevention study's shape (4 x up to 192 GSM8K tokens), interleaved over rounds. It prints the
per-step ratio ``1 + pass(batch) / (anchor_every * step)`` for each schedule, at that step and,
with ``--step-json``, at the unguarded step of an ``overhead.py --preset user`` run (8 x 512):

    python -m benchmarks.anchor_cost --rounds 3 --step-json benchmarks/results/overhead/user-8x512.json \\
        --json benchmarks/results/anchor_cost/smollm2.json

Retention at each setting comes from the prevention study (``rim_study.py --preset prevention``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.rimbench import data as bdata
from rimguard import GuardConfig, NeuronAtlas
from rimguard.actions.anchor import SafetyAnchor, record_anchor
from rimguard.hooks.arch import find_mlp_layers
from rimguard.hooks.capture import ActivationCapture
from rimguard.passes import encode, format_prompt, pad, pad_id
from rimguard.probes import bundled

HERE = Path(__file__).resolve().parent

SHARED = HERE.parent.parent / "shared" / "data"


def training_batches(tok, path: Path, count: int, batch: int, length: int) -> list:
    rows = bdata.load_gsm8k(path)[: count * batch]
    seqs = [encode(tok, format_prompt(tok, r["question"]) + r["answer"])[:length] for r in rows]
    return [pad(seqs[i : i + batch], pad_id(tok)) for i in range(0, len(seqs), batch)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--every", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--gsm8k", type=Path, default=SHARED / "gsm8k" / "train.jsonl")
    p.add_argument("--atlas", type=Path, default=HERE / "results" / "study" / "atlas", help="the study's atlas (its safety neurons)")
    p.add_argument("--step-json", type=Path, default=None, help="an overhead.py --preset user result: its unguarded step time")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from rimguard.demo.zoo import aligned_smollm2

    folder = aligned_smollm2()
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    capture = ActivationCapture(model, find_mlp_layers(model)).attach()
    # as the guard sets it up: the safety neurons' activations are read (the neuron term's weight is 0 by default)
    safety = [ids for ids, _ in capture.split(NeuronAtlas.load(args.atlas).safety_per_layer())]
    cfg = GuardConfig().actions
    record = record_anchor(model, tok, capture, safety, bundled("anchor_harmful"), bundled("anchor_harmless"),
                           cfg.anchor_max_new_tokens, 256, cfg.anchor_top_k)
    anchors = {bs: SafetyAnchor(record, safety, batch_size=bs, every=1, act_weight=cfg.anchor_act_weight) for bs in args.sizes}
    batches = training_batches(tok, args.gsm8k, args.rounds + 1, 4, 192)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def train_step(batch) -> None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()

    def anchor_pass(bs: int, step: int) -> None:
        anchors[bs].loss(model, capture, step).backward()
        model.zero_grad()

    train_step(batches[0])  # warm-up
    anchor_pass(args.sizes[0], 0)
    times: dict[str, list[float]] = {"step": [], **{f"anchor{bs}": [] for bs in args.sizes}}
    for r in range(args.rounds):
        for key in times:
            start = time.perf_counter()
            train_step(batches[r + 1]) if key == "step" else anchor_pass(int(key[6:]), r)
            times[key].append(time.perf_counter() - start)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    capture.remove()

    med = {k: statistics.median(v) for k, v in times.items()}
    steps = {"4x192 (measured here)": med["step"]}
    if args.step_json is not None and args.step_json.is_file():
        res = json.loads(args.step_json.read_text())["results"]["full"]["unguarded"]
        steps["8x512 (overhead.py --preset user, unguarded hot mean)"] = res["hot_mean_s"]
    rows_per_pass = {bs: len(anchors[bs].rows(0)) for bs in args.sizes}
    print(f"\nanchor record: {record.ids.shape[0]} rows, up to {record.ids.shape[1]} tokens; medians of {args.rounds} rounds")
    print(f"training step 4x192: {med['step']:.2f} s; " + ", ".join(f"anchor batch {bs}: {med[f'anchor{bs}']:.2f} s"
                                                                   for bs in args.sizes))
    curve = {}
    for shape, step in steps.items():
        print(f"\nper-step ratio at {shape} ({step:.2f} s a step): rows = anchor_batch_size, columns = anchor_every")
        print("batch " + "".join(f"{e:>8}" for e in args.every))
        for bs in args.sizes:
            ratios = [1 + med[f"anchor{bs}"] / (e * step) for e in args.every]
            curve[f"{shape}|{bs}"] = dict(zip(map(str, args.every), ratios))
            print(f"{bs:>5} " + "".join(f"{x:>8.3f}" for x in ratios))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"times": times, "median": med, "steps": steps, "rows_per_pass": rows_per_pass,
                                         "ratios": curve, "rounds": args.rounds, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
