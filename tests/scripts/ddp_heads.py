"""Run under torchrun: the refusal-head monitor on 2 CPU ranks (gloo); each rank dumps what it measured and
what one process measures on every probe."""

import json
import sys

import torch.distributed as dist

from rimguard import GuardConfig, GuardEngine
from rimguard.atlas.heads import answer_attention
from rimguard.probes import bundled
from rimguard.testing import marked, planted_heads_model, tiny_tokenizer

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
tok, model = tiny_tokenizer(), planted_heads_model()
# 7 head probes: the ranks measure 4 and 3 of them
config = GuardConfig(num_safety_probes=12, max_new_tokens=4, top_m=12, min_share=0.25, num_controls=4, probe_batch_size=4,
                     kl_probes=0, max_length=128, refusal_heads=2, head_probes=7)
engine = GuardEngine(config, safety_prompts=marked(bundled("harmful")[:12]))
engine.setup(model, tok, output_dir=out, inject_loss=False)
heads = engine.heads
mass, _ = answer_attention(model, heads.layers, heads.prompts, tok.pad_token_id, heads.record)  # every probe, here
record = {"rank": rank, "shard": len(heads.prompts[rank::2]), "ref": heads.ref_mass.tolist(), "measure": heads.measure(),
          "alone": mass[:, heads.layer_pos, heads.head].mean(0).tolist()}
with open(f"{out}/heads{rank}.json", "w") as fh:
    json.dump(record, fh)
engine.teardown()
dist.barrier()
dist.destroy_process_group()
