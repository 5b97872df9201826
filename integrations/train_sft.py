"""A guarded SFT script for the launch recipes in this folder (torchrun, accelerate, DeepSpeed).

    accelerate launch --config_file integrations/accelerate_ddp.yaml integrations/train_sft.py --model MODEL_DIR
    torchrun --nproc_per_node=2 integrations/train_sft.py --model tiny --cpu     # CPU smoke test (gloo)

``--model tiny`` builds a random 2-layer Llama (no download). ``--data`` takes a JSONL file with
``question``/``answer`` fields (GSM8K's format); by default generated word problems are used.
"""

from __future__ import annotations

import argparse
import gc

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.config import regularizer_names
from rimguard.events import read_jsonl
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer


def records(path: str | None, count: int) -> list[dict]:
    if path is None:
        return reasoning_texts(count)
    rows = read_jsonl(path)[:count]
    return [{"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder, or 'tiny'")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="runs/integration")
    p.add_argument("--mode", default="monitor", choices=["monitor", "regularize", "freeze", "escalate"])
    p.add_argument("--regularizer", default="anchor", choices=regularizer_names(),
                   help="what regularize adds (under FSDP2 and DeepSpeed: anchor or activation)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--probe-every", type=int, default=5)
    p.add_argument("--cpu", action="store_true", help="CPU processes with gloo")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config")
    a = p.parse_args()

    if a.model == "tiny":
        model, tok = tiny_model("llama"), tiny_tokenizer()
        guard_cfg = GuardConfig(mode=a.mode, regularizer=a.regularizer, probe_every=a.probe_every, num_safety_probes=12,
                                max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, max_length=128)
    else:
        model, tok = AutoModelForCausalLM.from_pretrained(a.model), AutoTokenizer.from_pretrained(a.model)
        guard_cfg = GuardConfig(mode=a.mode, regularizer=a.regularizer, probe_every=a.probe_every)
    args = SFTConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch, learning_rate=1e-4,
                     report_to=[], bf16=False, **no_checkpointing(), save_strategy="no", use_cpu=a.cpu,
                     ddp_backend="gloo" if a.cpu else None, deepspeed=a.deepspeed, max_length=256, logging_steps=5)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records(a.data, a.batch * a.steps * 8)),
                         processing_class=tok)
    RIMGuard.attach(trainer, guard_cfg)
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"rimguard integration run done: world_size={trainer.accelerator.num_processes}, output in {a.out}")
    if torch.distributed.is_initialized():  # tear down while the interpreter is alive: gloo can abort at exit otherwise
        del trainer
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
