"""The documented custom loop, guarded, on a tiny Llama: in one process, or under torchrun with FSDP2.

argv: output folder. Under torchrun (2 gloo ranks) every decoder layer and the model are wrapped by
``fully_shard`` and each rank trains on its half of every global batch; alone, the process trains on the
whole batch. Both see the same data (equal-length rows, so the mean loss of the halves averaged over
ranks is the mean loss of the batch), so the guard's numbers must agree. For each mode the main process
writes ``{mode}.json``: the guard's history, the anchor's gradient after the run, the frozen slices' check,
the weights before and after, and the history and weights of a run resumed halfway from a sharded checkpoint
(the model and optimizer through ``torch.distributed.checkpoint``, the guard from its saved state).
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from rimguard import GuardConfig, dist
from rimguard.actions.freeze import read
from rimguard.engine import GuardEngine
from rimguard.probes.reasoning import reasoning_texts
from rimguard.state import GuardState
from rimguard.testing import tiny_model, tiny_tokenizer

out = Path(sys.argv[1])
world = 1
if "LOCAL_RANK" in __import__("os").environ:
    torch_dist.init_process_group("gloo")
    world = torch_dist.get_world_size()
STEPS, HALF, BATCH, WIDTH = 10, 4, 4, 24  # the guard state is saved at HALF, a check step
tok = tiny_tokenizer()
task = [tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in reasoning_texts(8)]
data = torch.randint(3, 200, (STEPS, BATCH, WIDTH), generator=torch.Generator().manual_seed(1))
mine = slice(dist.rank() * BATCH // world, (dist.rank() + 1) * BATCH // world)
config = dict(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, probe_batch_size=4, kl_probes=2,
              max_length=128, probe_every=2, anchor_max_new_tokens=6, anchor_every=1, anchor_batch_size=4, freeze_top_fraction=0.5)


def build() -> torch.nn.Module:
    model = tiny_model("llama")
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: dist.full(p.detach()).clone() for name, p in model.named_parameters()}


def at(part: torch.Tensor, param: torch.Tensor, indexer) -> torch.Tensor:
    """``part`` (a parameter's local shard, or the whole tensor) at a frozen slice's indexer (flat positions when sharded)."""
    return part.reshape(-1)[indexer] if dist.is_sharded(param) else part[indexer]


def save_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Model and optimizer state, each rank writing its shards (one process: the whole tensors)."""
    model_state, opt_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=str(folder))


def load_checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    model_state, opt_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": opt_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def train(engine: GuardEngine, model, opt, steps: range) -> None:
    for step in steps:
        engine.begin_step(step)
        ids = data[step, mine]
        loss = model(input_ids=ids, labels=ids).loss
        extra = engine.reg_loss()
        (loss if extra is None else loss + extra).backward()
        engine.before_optimizer_step()
        opt.step()
        opt.zero_grad()
        engine.after_optimizer_step()
        engine.end_step(step + 1)


def run(mode: str, atlas) -> tuple[dict, object]:
    model = build()
    before = full_params(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    engine = GuardEngine(GuardConfig(mode=mode, **config), atlas=atlas, task_prompts=task)
    engine.setup(model, tok, out / mode, inject_loss=False)
    train(engine, model, opt, range(HALF))
    save_checkpoint(model, opt, out / mode / "checkpoint")
    if dist.is_main():
        engine.state().save(out / mode / "state")
    if world > 1:
        torch_dist.barrier()
    train(engine, model, opt, range(HALF, STEPS))
    record = {"history": engine.history, "frozen": engine.freezer.count, "frozen_intact": engine.freezer.verify()}
    if engine.freezer.count:  # the ops of the freeze's per-step work (gradient mask, write-back), after a backward
        ids = data[0, mine]
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.before_optimizer_step()
            engine.after_optimizer_step()
        record["freeze_step_ops"] = sorted({e.name for e in prof.events()})
        opt.zero_grad()
    if engine.regularizer is not None:  # the anchor's gradient alone, on the trained weights
        engine.begin_step(0)
        engine.reg_loss().backward()
        record["anchor_grad"] = {n: dist.full(p.grad).tolist() for n, p in model.named_parameters() if "mlp" in n and p.grad is not None}
        opt.zero_grad()
    engine.finish(STEPS)
    after = full_params(model)
    params = dict(model.named_parameters())
    record["frozen_unchanged"] = all(torch.equal(at(dist.local_part(before[n], params[n]), params[n], s.indexer), read(params[n], s.indexer))
                                     for n in params for s in engine.freezer._slices if s.param is params[n])
    record["moved"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
    record["weights"] = {n: after[n].double().sum().item() for n in after}

    # resume: a fresh model and optimizer loaded from the sharded checkpoint of the half-way step, and a fresh
    # engine from the guard state saved there
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    load_checkpoint(model, opt, out / mode / "checkpoint")
    restored = GuardState.read(out / mode / "state")
    again = GuardEngine(GuardConfig(mode=mode, **config), task_prompts=task)
    again.setup(model, tok, out / f"{mode}-resumed", inject_loss=False, restored=restored)
    train(again, model, opt, range(HALF, STEPS))
    record["resumed_history"] = again.history
    record["resumed_weights"] = {n: t.double().sum().item() for n, t in full_params(model).items()}
    again.finish(STEPS)
    return record, engine.atlas


atlas = None
for mode in ("monitor", "regularize", "freeze"):
    record, atlas = run(mode, atlas)
    if dist.is_main():
        (out / f"{mode}.json").write_text(json.dumps(record))
if world > 1:
    gc.collect()
    torch_dist.barrier()
    torch_dist.destroy_process_group()
