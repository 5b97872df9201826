"""Run under torchrun on GPUs: the HF Trainer with FSDP2 (``fsdp_config={"fsdp_version": 2}``), guarded.

argv: output folder, guard mode. Each rank writes what it saw to rank{N}.json. On CPU the Trainer runs
DDP instead of FSDP, so this script needs CUDA (tests/test_fsdp.py skips it without).
"""

import gc
import json
import sys
from pathlib import Path

import torch.distributed as torch_dist
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from rimguard import GuardConfig, RIMGuard, dist
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

out, mode = sys.argv[1], sys.argv[2]
tok = tiny_tokenizer()
texts = [r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in reasoning_texts(48)]
data = Dataset.from_dict({"input_ids": [tok(t)["input_ids"][:64] for t in texts]})
config = GuardConfig(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, max_length=128,
                     kl_probes=2, probe_every=2, mode=mode, anchor_max_new_tokens=6, anchor_every=1)
args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[],
                         save_strategy="no", fsdp="full_shard", logging_steps=100, disable_tqdm=True, seed=0,
                         fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
trainer = Trainer(model=tiny_model("llama"), args=args, train_dataset=data, processing_class=tok,
                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
guard = RIMGuard.attach(trainer, config)
trainer.train()
rank = torch_dist.get_rank()
record = {"rank": rank, "sharded": dist.sharded(trainer.model), "history": guard.history,
          "frozen": guard.engine.freezer.count, "frozen_intact": guard.engine.freezer.verify()}
Path(out, f"rank{rank}.json").write_text(json.dumps(record))
del trainer, guard
gc.collect()
torch_dist.barrier()
torch_dist.destroy_process_group()
