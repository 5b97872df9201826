"""A guarded SFT on a tiny model that can SIGKILL itself after an optimizer step, and resume.

argv: output folder, step to kill at (0: never), checkpoint to resume from ('' : none).
"""

import os
import signal
import sys

from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import reasoning_texts
from rimguard.testing import tiny_model, tiny_tokenizer

out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


TH = {"warn": {"task_rise": 0.0}, "regularize": {"task_rise": 0.002}, "freeze": {}, "stop": {}}
guard = RIMGuard(GuardConfig(num_safety_probes=12, max_new_tokens=6, top_m=12, min_share=0.25, num_controls=8, probe_batch_size=6,
                             kl_probes=2, max_length=128, probe_every=1, mode="escalate", thresholds=TH, hysteresis=0.0,
                             anchor_max_new_tokens=6))
args = SFTConfig(output_dir=out, max_steps=12, per_device_train_batch_size=4, learning_rate=2e-3, report_to=[], bf16=False,
                 **no_checkpointing(), save_strategy="steps", save_steps=4, use_cpu=True, max_length=64, seed=0,
                 disable_tqdm=True, logging_steps=100)
trainer = SFTTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(reasoning_texts(64)),
                     processing_class=tiny_tokenizer(), callbacks=[guard, Kill()])
trainer.train(resume_from_checkpoint=resume)
