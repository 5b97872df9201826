"""Two gloo ranks: a guard whose probes cannot be measured (max_length too small for them) is refused on every rank
with the main rank's AtlasError; each rank writes what it raised to <out>/rank<r>.txt."""

import sys
from pathlib import Path

import torch.distributed as torch_dist

from rimguard import GuardConfig, RIMGuard
from rimguard.atlas import AtlasError
from rimguard.testing import tiny_model, tiny_tokenizer

torch_dist.init_process_group("gloo")
out = Path(sys.argv[1])
guard = RIMGuard(GuardConfig(num_safety_probes=6, max_new_tokens=2, top_m=4, min_share=0.25, num_controls=2, max_length=16))
try:
    guard.engine.setup(tiny_model("llama"), tiny_tokenizer(), backend="ddp")
    said = "no error"
except AtlasError as err:
    said = f"AtlasError: {err}"
(out / f"rank{torch_dist.get_rank()}.txt").write_text(said)
torch_dist.destroy_process_group()
