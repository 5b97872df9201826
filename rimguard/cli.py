"""The ``rimguard`` command: identify, inspect, report, demo.

User mistakes (a missing file, a bad option) end with one line on stderr and exit code 2;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rimguard.atlas import AtlasError
from rimguard.config import ConfigError, add_arguments
from rimguard.probes import ProbeError

USER_ERRORS = (AtlasError, ConfigError, ProbeError, FileNotFoundError, FileExistsError, ValueError, ImportError)


def _identify(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rimguard.atlas import NeuronAtlas
    from rimguard.config import GuardConfig, from_arguments
    from rimguard.probes import ProbeSources

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"{args.model}: no such model folder")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: is a file; -o names the atlas folder to write")
    if (out / "atlas.json").exists():
        raise FileExistsError(f"{out}: holds an atlas already (rimguard inspect {out}); choose another -o, or remove it first")
    if not any((Path(args.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(f"{args.model}: no tokenizer files (tokenizer.json or tokenizer_config.json); save the "
                                "tokenizer beside the model (tokenizer.save_pretrained)")
    cfg = from_arguments(args, GuardConfig.load(args.config) if args.config else None)
    given = ProbeSources(harmful=args.safety, intent=args.intent, harmless=args.harmless or "bundled:harmless",
                         reasoning_spans=args.spans, key=args.key)
    # every probe file is read before the model is loaded: a typo fails in a second, not after the load
    sources = ProbeSources(**{name: given.load(name) for name in ("harmful", "intent", "harmless", "reasoning_spans")})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    atlas = NeuronAtlas.from_config(model, tokenizer, cfg, sources, progress=True)
    atlas.save(args.output)
    print(atlas.summary())
    print(f"saved to {args.output}")


def _inspect(args: argparse.Namespace) -> None:
    from rimguard.atlas import NeuronAtlas

    folder = Path(args.atlas)
    if not (folder / "atlas.json").is_file() and (folder / "rimguard_atlas" / "atlas.json").is_file():
        raise FileNotFoundError(f"{folder} is a run folder; its atlas is in {folder / 'rimguard_atlas'} "
                                f"(rimguard inspect {folder / 'rimguard_atlas'})")
    print(NeuronAtlas.load(folder).summary())


def _report(args: argparse.Namespace) -> None:
    from rimguard.report import write_report

    png, md = write_report(args.run_dir, run=args.run)
    print(f"wrote {png}\nwrote {md}")


def _demo(args: argparse.Namespace, extra: Sequence[str]) -> None:
    from rimguard.demo.app import main as demo

    demo(list(extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rimguard", description="Guard fine-tuning against reasoning-induced misalignment.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("identify", help="find safety-critical neurons of a model and save an atlas")
    p.add_argument("model", help="folder of a transformers causal LM (with its tokenizer)")
    p.add_argument("--safety", default="bundled:harmful", help="harmful prompts (.txt/.csv/.jsonl or bundled:NAME)")
    p.add_argument("--intent", default="bundled:intent", help="malicious-intent sentences")
    p.add_argument("--harmless", default=None, help="harmless prompts (for method effect_size, and the compliance side of "
                   "--refusal-heads; bundled:harmless there by default)")
    p.add_argument("--spans", default="bundled:reasoning_spans", help="reasoning passages placed before the answer to find "
                   "the refusal heads (with --refusal-heads)")
    p.add_argument("--key", default=None, help="column/field with the prompt text in CSV/JSONL files "
                   "(default: the first of prompt, goal, text, question, instruction, request)")
    p.add_argument("--config", default=None, help="GuardConfig YAML/JSON; the atlas flags below override it")
    p.add_argument("-o", "--output", required=True, help="atlas folder to write")
    add_arguments(p, sections=("atlas",))
    p = sub.add_parser("inspect", help="summarize a saved atlas")
    p.add_argument("atlas")
    p = sub.add_parser("report", help="plots and a Markdown summary of a guarded run")
    p.add_argument("run_dir", help="the run's output_dir (holds rimguard.jsonl)")
    p.add_argument("--run", default=None, help="run id (or a unique prefix) when the log holds several runs; default: the last")
    # no help of its own: -h/--help reach the demo's parser, which lists every demo flag
    sub.add_parser("demo", add_help=False, help="run the README's guarded fine-tune (rimguard demo --help: its flags)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "demo":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo":
            _demo(args, extra)
        else:
            {"identify": _identify, "inspect": _inspect, "report": _report}[args.command](args)
    except USER_ERRORS as err:
        print(f"rimguard {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
