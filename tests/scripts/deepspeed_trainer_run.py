"""The HF Trainer, guarded with ``RIMGuard.attach``, in one process or under torchrun with DeepSpeed (ZeRO-2 or ZeRO-3).

argv: output folder, guard mode, DeepSpeed JSON config (or ``none``: one plain process), and optionally ``resume``:
then the run also saves a checkpoint at step 4 and a second Trainer resumes from it. Alone, the process
trains on batches of 4; under torchrun (2 gloo ranks on DeepSpeed's CPU accelerator) each rank trains on 2, the other
half of the same global batch (equal-length rows, so the mean of the halves' losses is the batch's mean loss).
Every rank writes ``rank{N}.json``: the guard's history, the frozen slices' checks against the initial weights,
a digest of the trained weights and, with ``resume``, the resumed run's history and weights.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from rimguard import GuardConfig, RIMGuard, dist
from rimguard.testing import tiny_model, tiny_tokenizer

out, mode, ds_config = sys.argv[1], sys.argv[2], sys.argv[3]
resume = sys.argv[4:] == ["resume"]
ranks = int(os.environ.get("WORLD_SIZE", "1"))
tok = tiny_tokenizer()
rows = torch.randint(3, 200, (48, 24), generator=torch.Generator().manual_seed(1)).tolist()
model = tiny_model("llama")
initial = {n: p.detach().clone() for n, p in model.named_parameters()}


def guarded(model: torch.nn.Module) -> tuple[Trainer, RIMGuard]:
    args = TrainingArguments(output_dir=out, max_steps=10, per_device_train_batch_size=4 // ranks, learning_rate=2e-3, weight_decay=0.1,
                             report_to=[], save_strategy="steps" if resume else "no", save_steps=4, logging_steps=1, disable_tqdm=True,
                             seed=0, use_cpu=True, deepspeed=None if ds_config == "none" else ds_config)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}), processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    guard = RIMGuard.attach(trainer, GuardConfig(mode=mode, num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25,
                                                 num_controls=8, probe_batch_size=4, kl_probes=2, max_length=128, probe_every=2,
                                                 anchor_max_new_tokens=6, anchor_every=1, anchor_batch_size=4))
    return trainer, guard


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: dist.full(p).detach().clone() for n, p in model.named_parameters()}  # a collective: every rank gathers every tensor


trainer, guard = guarded(model)
trainer.train()
engine, model = guard.engine, trainer.model
params = dict(model.named_parameters())
trained = gathered(model)
frozen_equal = []  # per frozen slice: its trained values equal the initial ones, read from the gathered weights
for layer, ids in zip(engine.freezer.layers, engine.freezer.frozen):
    for param, indexer, _, _ in engine.freezer.targets(layer, ids) if ids.numel() else []:
        name = next(n for n, p in params.items() if p is param)
        frozen_equal.append(bool(torch.equal(trained[name][indexer], initial[name][indexer])))
rank = dist.rank()
backend = dist.backend_of(model, "deepspeed" if trainer.is_deepspeed_enabled else "single")
record = {"rank": rank, "world": ranks, "backend": backend, "history": guard.history, "frozen": engine.freezer.count,
          "frozen_intact": engine.freezer.verify(), "frozen_equal": frozen_equal,
          "moved": sorted(n for n in trained if not torch.equal(trained[n], initial[n])),
          "weights": {n: trained[n].double().sum().item() for n in trained},
          "losses": [(e["step"], e["loss"], e.get("grad_norm"), e.get("learning_rate")) for e in trainer.state.log_history if "loss" in e]}
if resume:  # a new Trainer and guard on a fresh model, resumed from the checkpoint of step 4 (model, optimizer, guard state)
    again, again_guard = guarded(tiny_model("llama"))
    again.train(resume_from_checkpoint=str(Path(out, "checkpoint-4")))
    resumed = gathered(again.model)
    record["resumed_history"] = again_guard.history
    record["resumed_weights"] = {n: resumed[n].double().sum().item() for n in resumed}
    del again, again_guard
Path(out, f"rank{rank}.json").write_text(json.dumps(record))
del trainer, guard, engine, model, params
gc.collect()
if torch_dist.is_initialized():
    torch_dist.barrier()
    torch_dist.destroy_process_group()
