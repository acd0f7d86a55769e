"""Command line: `python -m pruner {setup,info,eval,prune,generate}`.

With --json, stdout carries exactly one JSON object; progress bars and logs go to stderr.
Bad input exits with status 2 and a one-line `error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import ADMM_MASKS, RECONSTRUCT
from .errors import PrunerError
from .space import GRANULARITIES


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="`embedded`, a local checkpoint directory, or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")


def _pg_args(group) -> None:
    """One flag per PGConfig knob, generated from its metadata (pruner.pg.config)."""
    from .pg.config import describe, pg_fields

    for f in pg_fields():
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            group.add_argument(flag, dest=f"pg_{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                               help=meta["help"])
        else:
            group.add_argument(flag, dest=f"pg_{f.name}", type=type(f.default), default=f.default,
                               choices=meta["choices"], metavar=None if meta["choices"] else f.name.upper(),
                               help=f"{meta['help']}; {describe(f)} (default {f.default})")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

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
    p.add_argument("--ratio", type=float, default=None, help="fraction of decoder-linear parameters to remove, in (0, 1)")
    p.add_argument("--granularity", default=None, help=f"structured methods: one of {', '.join(GRANULARITIES)} "
                   "(default kv_group)")
    p.add_argument("--data", default="brown", help="calibration corpus (methods that use data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-windows", type=int, default=128, help="calibration windows for metric scores")
    p.add_argument("--out", required=True, help="directory for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty directory pruner did not write")
    p.add_argument("--run-dir", default=None, help="policy gradient: checkpoint folder (default OUT/run)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="policy gradient: continue the run checkpointed in DIR with its own settings")
    p.add_argument("--json", action="store_true")
    sparse = p.add_argument_group("unstructured / N:M sparsity (--method admm, sparsegpt, wanda, "
                                  "magnitude-unstructured); the result is a dense model with zeros")
    sparse.add_argument("--sparsity-type", default=None,
                        help="unstructured (default), 2:4 or 4:8 (N:M: --ratio is 1 - N/M and may be left out)")
    sparse.add_argument("--admm-mask", choices=ADMM_MASKS, default=None,
                        help="admm: gradual (the paper's cubic ramp, default) or reselect (the released code)")
    sparse.add_argument("--admm-iterations", type=int, default=None, help="admm (and --reconstruct admm): "
                        "ADMM iterations (default 20)")
    p.add_argument("--reconstruct", choices=RECONSTRUCT, default="none",
                   help="structured methods: refit the kept columns of o_proj and down_proj and their bias "
                        "on sequential calibration inputs after the mask is chosen (ls: least squares, "
                        "admm: the ADMM fixed-mask update; default none)")
    _pg_args(p.add_argument_group("policy gradient (--method pg)"))

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
    from .models import model_summary

    return model_summary(_load(args), args.granularity) | {"model": args.model}


def cmd_eval(args) -> dict:
    from .corpus import load_text
    from .evaluate import check_context, perplexity
    from .windows import eval_windows, tokenize

    if args.batch_size < 1:
        raise PrunerError("--batch-size must be at least 1")
    text = load_text(args.data, args.split)
    loaded = _load(args)
    check_context(loaded.model, args.seqlen, "--seqlen")
    windows = eval_windows(tokenize(loaded.tokenizer, text), args.seqlen, args.max_windows)
    result = perplexity(loaded.model, windows, args.batch_size, progress=True)
    return result | {"data": args.data, "split": args.split, "model": args.model}


def prune_config_from_args(args):
    """A PruneConfig from the flags, or, with --resume, from the run's checkpointed settings."""
    from .config import PruneConfig
    from .fileio import recover
    from .methods import check_config, get_method
    from .models import RUN_SUBDIR
    from .pg.checkpoint import read_settings
    from .pg.config import PGConfig, pg_fields
    from .sparsity_masks import parse_sparsity_type

    if args.resume:
        run_dir = Path(args.resume)
        recover(run_dir.parent)  # a save killed midway may have left the folder aside
        recover(run_dir)
        if not run_dir.is_dir():
            raise PrunerError(f"no run folder at {run_dir}: give the `run` folder of an interrupted search")
        settings = read_settings(run_dir)
        args.model = settings.get("model", args.model)
        config = PruneConfig.from_dict({k: v for k, v in settings.items() if k not in ("model", "run_dir")})
        return dataclasses.replace(config, run_dir=str(run_dir))
    method = get_method(args.method)
    _check_flags(args, method)
    sparsity_type = str(parse_sparsity_type(args.sparsity_type or "unstructured"))
    ratio = args.ratio
    if ratio is None:
        kind = parse_sparsity_type(sparsity_type)
        if not kind.is_nm:
            raise PrunerError("--ratio is required: the fraction of decoder-linear parameters to remove, e.g. --ratio 0.3")
        ratio = kind.nm_sparsity
    pg = PGConfig(**{f.name: getattr(args, f"pg_{f.name}") for f in pg_fields()})
    run_dir = None
    if args.method == "pg":
        run_dir = args.run_dir or str(Path(args.out) / RUN_SUBDIR)
        if Path(run_dir).exists() and not Path(run_dir).is_dir():
            raise PrunerError(f"--run-dir {run_dir} is a file: give a folder for the search's checkpoints")
    admm = {k: v for k, v in (("admm_mask", args.admm_mask), ("admm_iterations", args.admm_iterations)) if v is not None}
    return check_config(PruneConfig(method=args.method, ratio=ratio, granularity=args.granularity or "kv_group",
                                    data=args.data, seed=args.seed, calib_windows=args.calib_windows, pg=pg,
                                    run_dir=run_dir, sparsity_type=sparsity_type, reconstruct=args.reconstruct,
                                    **admm))


def _check_flags(args, method) -> None:
    """Flags that do not fit the method: a one-line error instead of being ignored."""
    if args.sparsity_type is not None and not method.sparse:
        raise PrunerError(f"--sparsity-type is for the methods that zero single weights (admm, sparsegpt, wanda, "
                          f"magnitude-unstructured); {method.name} removes whole heads and channels")
    if method.sparse and args.granularity is not None:
        raise PrunerError(f"--granularity chooses the units a structured method removes; {method.name} zeroes "
                          "single weights (choose the pattern with --sparsity-type)")
    if args.admm_mask is not None and method.name != "admm":
        raise PrunerError(f"--admm-mask is a setting of --method admm, not of {method.name}")
    if args.admm_iterations is not None and method.name != "admm" and args.reconstruct != "admm":
        raise PrunerError("--admm-iterations is a setting of --method admm and of --reconstruct admm")


def cmd_prune(args) -> dict:
    from .fileio import check_writable
    from .models import prepare_output_dir, save_pruned
    from .prune import prune

    out = Path(args.out)
    config = prune_config_from_args(args)
    overwrite = args.overwrite or bool(args.resume and Path(args.resume).parent == out)
    prepare_output_dir(out, overwrite)
    if config.run_dir:
        check_writable(Path(config.run_dir))
        print(f"checkpoints in {config.run_dir}: continue an interrupted run with --resume {config.run_dir}",
              file=sys.stderr)
    loaded = _load(args)
    pruned, _, report = prune(loaded, config)
    save_pruned(pruned, loaded.tokenizer, out, report, overwrite)
    return report | {"out": str(out)}


def cmd_generate(args) -> dict:
    from .evaluate import check_context, generate

    if not args.prompt.strip():
        raise PrunerError("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        raise PrunerError("--max-new-tokens must be at least 1")
    loaded = _load(args)
    n_prompt = len(loaded.tokenizer(args.prompt)["input_ids"])
    check_context(loaded.model, n_prompt + args.max_new_tokens, "the prompt plus --max-new-tokens")
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
