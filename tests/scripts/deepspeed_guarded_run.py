"""Run under torchrun: a guarded HF Trainer run with DeepSpeed ZeRO-2 on 2 CPU ranks (gloo).

argv: output folder, DeepSpeed JSON config, guard mode. Each rank writes what it saw to rank{N}.json.
"""

import gc
import json
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from rimguard import GuardConfig, RIMGuard
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

out, ds_config, mode = sys.argv[1], sys.argv[2], sys.argv[3]
tok = tiny_tokenizer()
texts = [r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in reasoning_texts(48)]
data = Dataset.from_dict({"input_ids": [tok(t)["input_ids"][:64] for t in texts]})
guard = RIMGuard(GuardConfig(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, max_length=128,
                             kl_probes=2, probe_every=2, mode=mode, regularizer="activation"))  # the anchor is refused under DeepSpeed
args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                         save_strategy="no", deepspeed=ds_config, logging_steps=100, disable_tqdm=True, seed=0)
trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=data, processing_class=tok, callbacks=[guard],
                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
trainer.train()
rank = dist.get_rank()
record = {"rank": rank, "world": dist.get_world_size(), "deepspeed": trainer.is_deepspeed_enabled, "history": guard.history}
Path(out, f"rank{rank}.json").write_text(json.dumps(record))
# Tear down while the interpreter is alive: gloo work objects still referenced at interpreter exit
# abort the process ("terminate called without an active exception") in about 1 run of 10.
del trainer, guard
gc.collect()
dist.barrier()
dist.destroy_process_group()
