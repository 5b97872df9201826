"""Alignment recipes of the demo subject: build time against refusal and over-refusal.

Each candidate recipe (``--recipe name:field=value,field=value``; fields of
``rimguard.demo.zoo.ALIGN_DEFAULTS``) is built by :func:`rimguard.demo.zoo.aligned_smollm2` into a
scratch cache (the fp32 base model is linked from the user cache, so only the alignment is timed),
then judged on sets the recipe never trains on:

* the bundled held-out harmful and harmless prompts (``recipe.json`` of the build);
* 48 AdvBench prompts (the same draw as ``rim_study.py``'s evaluation set), 24 greedy tokens;
* XSTest's 250 safe prompts (over-refusal), 24 greedy tokens.

One JSON per recipe in ``--out`` (skipped when present: the sweep resumes), plus ``summary.md``.

    python -m benchmarks.align_recipe --recipe current: --recipe fast:steps=30,learning_rate=1e-4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.rimbench import data as bdata
from rimguard.signals.metrics import wilson

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"


def parse_recipe(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    overrides = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return name, overrides


def judge_set(model, tok, prompts: list[str]) -> dict:
    from rimguard.passes import generate
    from rimguard.signals.judge import judge

    texts = generate(model, tok, prompts, 24, batch_size=48)
    verdicts = [judge(t) for t in texts]
    n, k = len(verdicts), verdicts.count("refusal")
    return {"refusal_rate": k / n, "ci95": wilson(k, n), "n": n, "garbage": verdicts.count("garbage"),
            "samples": [{"prompt": p, "completion": t, "verdict": v} for p, t, v in list(zip(prompts, texts, verdicts))[:12]]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", required=True, help="name:field=json,field=json (empty: the defaults)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "align")
    p.add_argument("--harmful", type=Path, default=SHARED / "advbench" / "harmful_behaviors.csv")
    p.add_argument("--xstest", type=Path, default=SHARED / "xstest" / "xstest_prompts.csv")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rimguard.demo import zoo

    adv = bdata.load_advbench(args.harmful)
    harmful = [adv[i] for i in sorted(bdata.sample(range(len(adv)), 48, seed=0))]
    xstest = [r["prompt"] for r in bdata.load_xstest(args.xstest)]
    base = zoo.smollm2_base()
    args.out.mkdir(parents=True, exist_ok=True)
    for text in args.recipe:
        name, overrides = parse_recipe(text)
        path = args.out / f"{name}.json"
        if path.is_file():
            print(f"{name}: done already ({path})", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="rimguard-align-") as scratch:
            (Path(scratch) / zoo.SMOLLM2_DIR).symlink_to(base)
            start = time.perf_counter()
            folder = zoo.aligned_smollm2(cache_dir=scratch, **overrides)
            wall = time.perf_counter() - start
            built = json.loads((folder / "recipe.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(folder))
            rec = {"name": name, "overrides": overrides, "build_wall_seconds": round(wall, 1), **built,
                   "advbench": judge_set(model, tok, harmful), "xstest": judge_set(model, tok, xstest),
                   "threads": torch.get_num_threads()}
            shutil.rmtree(folder, ignore_errors=True)
        path.write_text(json.dumps(rec, indent=1))
        m = rec["measured"]
        print(f"{name}: build {wall:.0f}s {m['phase_seconds']}; held-out refusal {m['heldout_refusal_rate']:.0%}, "
              f"over-refusal {m['heldout_over_refusal_rate']:.0%}; AdvBench {rec['advbench']['refusal_rate']:.0%}, "
              f"XSTest over-refusal {rec['xstest']['refusal_rate']:.0%}", file=sys.stderr)
    rows = [json.loads(f.read_text()) for f in sorted(args.out.glob("*.json"))]
    lines = ["| recipe | overrides | build s | phases s | held-out refusal (24) | held-out over-refusal (24) | AdvBench refusal (48) "
             "| XSTest over-refusal (250) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["build_wall_seconds"]):
        m = r["measured"]
        lines.append(f"| {r['name']} | `{json.dumps(r['overrides'])}` | {r['build_wall_seconds']:.0f} | {m.get('phase_seconds', {})} | "
                     f"{m['heldout_refusal_rate']:.0%} | {m['heldout_over_refusal_rate']:.0%} | "
                     f"{r['advbench']['refusal_rate']:.0%} [{r['advbench']['ci95'][0]:.2f}, {r['advbench']['ci95'][1]:.2f}] | "
                     f"{r['xstest']['refusal_rate']:.0%} [{r['xstest']['ci95'][0]:.2f}, {r['xstest']['ci95'][1]:.2f}] |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
