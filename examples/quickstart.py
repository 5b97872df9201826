"""rimguard in an existing TRL script: a complete, runnable quick start (CPU or GPU).

    python examples/quickstart.py --model PATH_TO_A_CAUSAL_LM      # a folder with weights and tokenizer
    python examples/quickstart.py --model tiny                      # a tiny random model, no download (seconds)

On a GPU: drop ``use_cpu=True`` and set ``bf16=True`` if the card supports it (identify the atlas
once in fp32 with ``rimguard identify`` and pass ``atlas=`` so reduced precision does not change it).
"""

import argparse

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from rimguard import GuardConfig, RIMGuard
from rimguard.compat import no_checkpointing
from rimguard.probes.reasoning import problems

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", required=True, help="model folder, or 'tiny' for a random test model")
parser.add_argument("--out", default="runs/quickstart")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

overrides = {}
if args.model == "tiny":
    from rimguard.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    overrides = dict(min_share=0.1, top_m=0.05, max_length=128)  # a random model has no consistent safety neurons
else:
    model, tok = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)

# a reasoning dataset in TRL's conversational prompt/completion format (use your own here)
ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}],
                         "completion": [{"role": "assistant", "content": p.solution()}]} for p in problems(200)])

sft = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-4, max_length=256,
                use_cpu=True, bf16=False, **no_checkpointing(),  # activation (gradient) checkpointing off, by its name in your transformers
                report_to=[], save_strategy="no", logging_steps=5)

trainer = SFTTrainer(model=model, args=sft, train_dataset=ds, processing_class=tok)
guard = RIMGuard.attach(trainer, GuardConfig(mode="regularize", probe_every=10, **overrides))  # the safety anchor + the alarms
trainer.train()
print(f"risk level {guard.level}, action in force: {guard.action}; log: {args.out}/rimguard.jsonl "
      f"(plots: rimguard report {args.out})")
