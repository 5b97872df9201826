#!/usr/bin/env bash
# Step-time overhead, interleaved between two commits of rimguard (before and after a change), in rounds
# before/after/before/after; one JSON per invocation in OUT (named MODEL-SIDE-rROUND.json; resumable).
#   bash benchmarks/results/overhead/run_interleaved.sh BEFORE_REV AFTER_REV OUT MODEL [overhead.py options]
#   python -m benchmarks.overhead_summary OUT
# Each side is a git worktree of its commit, measured by that commit's own benchmarks/overhead.py (the script
# measures the same way on both sides; it changed only in how it imports), with that commit's rimguard first on
# the path. Every ratio is to the unguarded run of the same invocation, so the two sides compare as ratios.
# (The smollm2-*.json files beside this script, 2026-11-25, came from an earlier form of it: this checkout's
# script on c7516cf and 2fd876a.)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
BEFORE="$1"; AFTER="$2"; OUT="$(mkdir -p "$3" && cd "$3" && pwd)"; MODEL="$4"; shift 4
PY="${PYTHON:-$ROOT/.venv/bin/python}"
ARGS=(--model "$MODEL" "$@")
trees="$(mktemp -d)"
trap 'git -C "$ROOT" worktree remove --force "$trees/before" 2>/dev/null; git -C "$ROOT" worktree remove --force "$trees/after" 2>/dev/null; rm -rf "$trees"' EXIT
git -C "$ROOT" worktree add --detach -q "$trees/before" "$BEFORE"
git -C "$ROOT" worktree add --detach -q "$trees/after" "$AFTER"
for round in 1 2; do
  for side in before after; do
    out="$OUT/$MODEL-$side-r$round.json"
    [ -f "$out" ] && continue
    tree="$trees/$side"
    if [ -f "$tree/benchmarks/__init__.py" ]; then script=(-m benchmarks.overhead); else script=(benchmarks/overhead.py); fi
    (cd "$tree" && PYTHONPATH="$tree" OMP_NUM_THREADS=2 "$PY" "${script[@]}" "${ARGS[@]}" --json "$out")
  done
done
