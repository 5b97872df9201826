#!/usr/bin/env bash
# Step-time overhead on SmolLM2-135M, interleaved between two checkouts of rimguard (before and after
# a change), with this checkout's benchmark script; one JSON per invocation beside this file.
#   bash benchmarks/results/overhead/run_interleaved.sh BEFORE_CHECKOUT AFTER_CHECKOUT
# This session: BEFORE = c7516cf (before the engine redesign), AFTER = 2fd876a (after it).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
BEFORE="$1"
AFTER="$2"
ARGS=(--model smollm2 --data "$ROOT/../shared/data/gsm8k/train.jsonl" --batch 4 --max-length 192 --steps 16 --warmup 8
      --probe-every 16 --probes 16 --repeats 1 --ft full --modes monitor regularize anchor-every4)
for round in 1 2; do
  for side in before after; do
    out="$HERE/smollm2-$side-r$round.json"
    [ -f "$out" ] && continue  # resumable: finished invocations are kept
    src=$([ "$side" = before ] && echo "$BEFORE" || echo "$AFTER")
    PYTHONPATH="$src" OMP_NUM_THREADS=2 python "$ROOT/benchmarks/overhead.py" "${ARGS[@]}" --json "$out"
  done
done
