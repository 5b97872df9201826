"""Run under torchrun: a guarded SFT with freezing on 2 CPU ranks (gloo); each rank dumps what it saw."""

import gc
import json
import sys

import torch.distributed as dist
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

out = sys.argv[1]
family = sys.argv[2] if len(sys.argv) > 2 else "llama"
TH = {"warn": {"task_rise": 0.0}, "regularize": {"task_rise": 0.0004}, "freeze": {"task_rise": 0.0009}, "stop": {}}
config = GuardConfig(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, probe_batch_size=4,
                     kl_probes=2, max_length=128, probe_every=2, mode="escalate", thresholds=TH, hysteresis=0.0,
                     freeze_top_fraction=0.5, anchor_max_new_tokens=6,
                     level_actions={"warn": ["warn", "regularize"]})  # the safety anchor from the first warning (step 1) on
guard = RIMGuard(config)
args = SFTConfig(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=2e-3, report_to=[], bf16=False,
                 **no_checkpointing(), save_strategy="no", use_cpu=True, ddp_backend="gloo", max_length=64, seed=0,
                 disable_tqdm=True, logging_steps=100)
model = tiny_model(family)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(reasoning_texts(48)), processing_class=tiny_tokenizer(),
                     callbacks=[guard])
trainer.train()
rank = dist.get_rank()
record = {
    "rank": rank,
    "history": guard.history,
    "frozen": [f.tolist() for f in guard.engine.freezer.frozen],
    "frozen_intact": guard.engine.freezer.verify(),
    "frozen_checksum": [s.value.double().sum().item() for s in guard.engine.freezer._slices],
    "weights_checksum": sum(p.double().sum().item() for p in trainer.model.parameters()),
}
with open(f"{out}/rank{rank}.json", "w") as fh:
    json.dump(record, fh)
# Tear down while the interpreter is alive: gloo work objects still referenced at interpreter exit
# abort the process ("terminate called without an active exception") in about 1 run of 10.
del trainer, guard
gc.collect()
dist.barrier()
dist.destroy_process_group()
