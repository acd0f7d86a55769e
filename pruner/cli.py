"""Command line: `python -m pruner {setup,info,eval,prune,generate}`.

With --json, stdout carries exactly one JSON object; progress bars and logs go to stderr.
Bad input exits with status 2 and a one-line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import PrunerError
from .space import GRANULARITIES


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="`embedded`, a local checkpoint directory, or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")


def build_parser() -> argparse.ArgumentParser:
    from .prune import METHODS

    parser = argparse.ArgumentParser(prog="python -m pruner", description="Structural pruning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("setup", help="prepare the embedded model and corpus (idempotent)")

    p = sub.add_parser("info", help="architecture, head counts and parameter counts of a model")
    _model_args(p)
    p.add_argument("--granularity", default="kv_group", help=f"unit granularity: {', '.join(GRANULARITIES)}")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="perplexity on non-overlapping windows")
    _model_args(p)
    p.add_argument("--data", default="brown", help="brown (embedded), wikitext2, c4, or a path to a text file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("prune", help="prune, slice and save a model")
    _model_args(p)
    p.add_argument("--method", default="magnitude", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--ratio", type=float, required=True, help="fraction of decoder-linear parameters to remove, in (0, 1)")
    p.add_argument("--granularity", default="kv_group", help=f"one of {', '.join(GRANULARITIES)}")
    p.add_argument("--data", default="brown", help="calibration corpus (methods that use data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty directory pruner did not write")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("generate", help="greedy generation from a prompt")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--json", action="store_true")
    return parser


def _load(args):
    from .models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def cmd_setup(args) -> dict:
    from .assets import setup

    return setup()


def cmd_info(args) -> dict:
    from .evaluate import total_params
    from .space import PruningSpace, check_granularity

    check_granularity(args.granularity)
    loaded = _load(args)
    space = PruningSpace.from_model(loaded.model, loaded.adapter, args.granularity)
    shapes = space.shapes

    def one_or_list(values):
        return values[0] if len(set(values)) == 1 else values

    return {
        "model": args.model,
        "architecture": loaded.adapter.name,
        "model_class": type(loaded.model).__name__,
        "layers": space.n_layers,
        "hidden_size": space.hidden,
        "heads": one_or_list([s.n_q for s in shapes]),
        "kv_heads": one_or_list([s.n_kv for s in shapes]),
        "head_dim": shapes[0].head_dim,
        "intermediate_size": one_or_list([s.d_ff for s in shapes]),
        "total_params": total_params(loaded.model),
        "decoder_linear_params": space.decoder_linear_params(),
        "units": space.describe() | {"head_unit_cost": one_or_list(space.describe()["head_unit_cost"]),
                                      "channel_unit_cost": one_or_list(space.describe()["channel_unit_cost"])},
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
    }


def cmd_eval(args) -> dict:
    from .corpus import load_text
    from .evaluate import perplexity
    from .windows import eval_windows, tokenize

    if args.batch_size < 1:
        raise PrunerError("--batch-size must be at least 1")
    text = load_text(args.data, args.split)
    loaded = _load(args)
    windows = eval_windows(tokenize(loaded.tokenizer, text), args.seqlen, args.max_windows)
    result = perplexity(loaded.model, windows, args.batch_size, progress=True)
    return result | {"data": args.data, "split": args.split, "model": args.model}


def cmd_prune(args) -> dict:
    from .models import prepare_output_dir, save_pruned
    from .prune import PruneConfig, prune

    config = PruneConfig(method=args.method, ratio=args.ratio, granularity=args.granularity,
                         data=args.data, seed=args.seed).validate()
    out = Path(args.out)
    prepare_output_dir(out, args.overwrite)
    loaded = _load(args)
    pruned, _, report = prune(loaded, config)
    save_pruned(pruned, loaded.tokenizer, out, report, overwrite=args.overwrite)
    return report | {"out": str(out)}


def cmd_generate(args) -> dict:
    from .evaluate import generate

    if args.max_new_tokens < 1:
        raise PrunerError("--max-new-tokens must be at least 1")
    loaded = _load(args)
    return {"prompt": args.prompt, "completion": generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens)}


COMMANDS = {"setup": cmd_setup, "info": cmd_info, "eval": cmd_eval, "prune": cmd_prune, "generate": cmd_generate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = COMMANDS[args.command](args)
    except PrunerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result))
    elif args.command == "generate":
        print(result["completion"])
    else:
        print(json.dumps(result, indent=2))
    return 0
