"""GPU readiness of rimguard's hot path, on one CUDA device, with no download (random weights).

    python -m benchmarks.gpu                                # a CUDA machine: all three parts
    python -m benchmarks.gpu --size 1b --batch 8 --seq 1024   # a larger model shape
    python -m benchmarks.gpu --device cpu --size tiny --steps 4 --repeats 1   # smoke test of the code path

1. **Reductions.** Every variant of the per-layer masked max (plain torch, ``torch.compile``-fused)
   at the model's shape: error against float64, time, and bandwidth as a fraction of the device's
   copy bandwidth (:mod:`benchmarks.reduction`).
2. **Step-time ratios.** A hand-written training loop (AdamW, bf16 autocast on CUDA) on a random
   Llama of the chosen shape, unguarded and with the guard in each ``--modes`` configuration,
   interleaved ``--repeats`` times. Per-step ratio: median step time over steps without a check;
   check cost: a check step's extra time, in training steps.
3. **No host sync.** The guarded loop runs its non-check steps under
   ``torch.cuda.set_sync_debug_mode("error")``: any device-to-host synchronisation in the hooks,
   the reductions, the regularizer or the freeze raises and is reported with its stack. The
   unguarded loop runs under the same mode first, as the control. Check steps read values to
   decide and are excluded by design.

Results go to ``--out`` (JSON) as they are measured, and a summary is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks.reduction import reference, timeit
from rimguard import AtlasError, GuardConfig, NeuronAtlas, RIMGuard
from rimguard.hooks.reduce import get_reducer
from rimguard.testing import tiny_tokenizer

HERE = Path(__file__).resolve().parent

# Llama-style shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
SIZES = {
    "tiny": (64, 128, 2, 4, 2, 600),
    "135m": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M
    "1b": (2048, 8192, 16, 32, 8, 128256),  # Llama-3.2-1B
}
CONFIGS = {
    "monitor": {"mode": "monitor"},
    "regularize": {"mode": "regularize"},  # the safety anchor, every step
    "anchor-every4": {"mode": "regularize", "anchor_every": 4},
    "activation": {"mode": "regularize", "regularizer": "activation"},
    "freeze": {"mode": "freeze"},
}


def build_model(size: str, device: torch.device) -> torch.nn.Module:
    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(device)


def find_atlas(model, tok) -> NeuronAtlas:
    """An atlas on the random model (timing does not need meaningful neurons, only their number)."""
    for share in (0.25, 0.1, 0.03):
        try:
            return NeuronAtlas.from_config(model, tok, GuardConfig(num_safety_probes=16, top_m=0.01, min_share=share, num_controls=32,
                                                                   max_new_tokens=8, max_length=128))
        except AtlasError:
            continue
    raise SystemExit("no atlas could be identified on the random model")


def reductions(args, model, device, dtype) -> list[dict]:
    b, t, i = args.batch, args.seq, model.config.intermediate_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, t, i, device=device, generator=gen).to(dtype)
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    mask[: b // 2, t // 2 :] = 0
    dst = torch.empty_like(x)
    copy_bw = 2 * x.numel() * x.element_size() / timeit(lambda: dst.copy_(x), args.iters, device) / 1e9
    rows = []
    for tracked in (0.01, 1.0):
        index = torch.randperm(i, device=device, generator=gen)[: max(1, int(tracked * i))].sort().values
        ref = reference(x, mask, index)
        for name, fn in (("plain", get_reducer(device, fused=False)), ("fused", get_reducer(device, fused=True))):
            err = (fn(x, mask, index)[0].double() - ref).abs().max().item()
            sec = timeit(lambda fn=fn, index=index: fn(x, mask, index), args.iters, device)
            bw = (x.numel() * x.element_size() + mask.numel() * mask.element_size()) / sec / 1e9
            rows.append({"shape": [b, t, i], "tracked": tracked, "variant": name, "max_err": err, "ms": sec * 1e3,
                         "GB/s": bw, "copy_GB/s": copy_bw, "of_copy": bw / copy_bw})
    return rows


class Loop:
    """A minimal training loop driving the guard through its custom-loop API."""

    def __init__(self, args, model, tok, atlas, device, overrides: dict | None) -> None:
        self.model, self.device, self.args = model, device, args
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.01)
        self.guard = None
        if overrides is not None:
            cfg = GuardConfig(probe_every=args.probe_every, num_safety_probes=16, max_new_tokens=8, max_length=128,
                              probe_batch_size=8, kl_probes=4, margin_probes=8, log_file=None, **overrides)
            self.guard = RIMGuard(cfg, atlas=atlas)
            self.guard.engine.setup(model, tok, inject_loss=False)
        gen = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(3, tok.vocab_size, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step(self, step: int) -> None:
        """One optimizer step; ``step`` counts the steps done before it."""
        g = self.guard
        ids = self.batches[step % len(self.batches)]
        self.model.train()
        with self.autocast:
            if g is not None:
                g.engine.begin_step(step)  # the anchor's forward, in the loop's precision
            loss = self.model(input_ids=ids, labels=ids).loss
            extra = g.engine.reg_loss() if g is not None else None
            if extra is not None:
                loss = loss + extra
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if g is not None:
            g.engine.after_optimizer_step()
            g.engine.monitor.step_end()
            if g.engine.due(step + 1):
                g.engine.check(step + 1)

    def is_check(self, step: int) -> bool:
        return self.guard is not None and self.guard.engine.due(step + 1)

    def close(self) -> None:
        if self.guard is not None:
            self.guard.engine.teardown()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_loop(loop: Loop, args, device) -> dict:
    """Warm up past the guard's early checks, then time ``--steps`` steps (synchronised at step ends)."""
    times, checks = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        loop.step(step)
        sync(device)
        if step >= args.warmup:
            (checks if loop.is_check(step) else times).append(time.perf_counter() - t0)
    median = statistics.median(times)
    extra = statistics.median(checks) - median if checks else None
    return {"median_s": median, "check_s": extra, "check_steps": extra / median if extra is not None else None}


def no_sync(loop: Loop, args, device) -> dict:
    """Run the loop with sync debug mode 'error' on every non-check step; report the first sync."""
    if device.type != "cuda":
        return {"status": "skipped (no CUDA)"}
    for step in range(args.sync_steps):
        checking = loop.is_check(step)
        torch.cuda.set_sync_debug_mode(0 if checking else "error")
        try:
            loop.step(step)
        except RuntimeError as err:
            return {"status": "FAIL", "step": step, "error": str(err).splitlines()[0], "stack": traceback.format_exc()[-3000:]}
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"status": "ok", "steps": args.sync_steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration and repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (covers the early checks 1, 2, 4, 8)")
    p.add_argument("--probe-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sync-steps", type=int, default=12)
    p.add_argument("--iters", type=int, default=20, help="timing iterations per reduction")
    p.add_argument("--modes", nargs="+", choices=sorted(CONFIGS), default=["monitor", "regularize", "anchor-every4", "freeze"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu" / "gpu.json")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": name, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    tok = tiny_tokenizer()
    model = build_model(args.size, device)
    atlas = find_atlas(model, tok)
    result["atlas"] = {"safety_neurons": atlas.num_safety, "tracked": int(atlas.tracked.shape[0])}
    print(f"device: {name}; model: random Llama '{args.size}'; batch {args.batch} x {args.seq} tokens; "
          f"{atlas.num_safety} safety neurons, {atlas.tracked.shape[0]} tracked")

    result["reductions"] = reductions(args, model, device, dtype)
    save()
    print(f"\n1. reductions at [{args.batch}, {args.seq}, {model.config.intermediate_size}]")
    print(f"{'tracked':>8}{'variant':>9}{'max err':>10}{'ms':>9}{'GB/s':>8}{'of copy':>9}")
    for r in result["reductions"]:
        print(f"{r['tracked']:>8.0%}{r['variant']:>9}{r['max_err']:>10.2e}{r['ms']:>9.3f}{r['GB/s']:>8.1f}{r['of_copy']:>9.0%}")

    runs: dict[str, list[dict]] = {m: [] for m in ["unguarded", *args.modes]}
    for _ in range(args.repeats):
        for mode in runs:
            model = build_model(args.size, device)
            loop = Loop(args, model, tok, atlas, device, CONFIGS.get(mode))
            runs[mode].append(time_loop(loop, args, device))
            loop.close()
            del loop, model
            result["step_times"] = runs
            save()
    base = statistics.median(r["median_s"] for r in runs["unguarded"])
    result["ratios"] = {}
    print(f"\n2. step time ({args.repeats} interleaved repeats, median of {args.steps} steps each)")
    print(f"{'mode':<16}{'s/step':>10}{'per-step':>10}{'check steps':>13}")
    for mode, rows in runs.items():
        med = statistics.median(r["median_s"] for r in rows)
        cs = [r["check_steps"] for r in rows if r["check_steps"] is not None]
        check_steps = statistics.median(cs) if cs else None
        result["ratios"][mode] = {"per_step": med / base, "check_steps": check_steps,
                                  "amortized": med / base + (check_steps or 0.0) * med / base / args.probe_every}
        print(f"{mode:<16}{med:>10.4f}{med / base:>10.3f}{check_steps if check_steps is not None else float('nan'):>13.2f}")
    save()

    print("\n3. no host sync on non-check steps (torch.cuda.set_sync_debug_mode('error'))")
    result["no_sync"] = {}
    for mode in ["unguarded", *args.modes]:
        model = build_model(args.size, device)
        loop = Loop(args, model, tok, atlas, device, CONFIGS.get(mode))
        result["no_sync"][mode] = no_sync(loop, args, device)
        loop.close()
        del loop, model
        outcome = result["no_sync"][mode]
        print(f"{mode:<16}{outcome['status']}" + (f" at step {outcome['step']}: {outcome['error']}" if outcome["status"] == "FAIL" else ""))
        save()
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
