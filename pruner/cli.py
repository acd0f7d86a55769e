"""Command line: `python -m pruner {setup,info,eval,prune,generate}`.

With --json, stdout carries exactly one JSON object; progress bars and logs go to stderr.
Bad input exits with status 2 and a one-line `error: ...` on stderr, before any work and with
nothing written: arguments are checked first, libraries' own logs and load bars are off, and
Python warnings are shown only after a command that succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .config import ADMM_MASKS, RECONSTRUCT, REFIT_DAMP, WANDA_SP_STATS
from .dispatch import DEVICE_MAPS
from .errors import PrunerError
from .space import GRANULARITIES


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are PrunerErrors: one line, exit status 2, like every bad input."""

    def error(self, message: str):
        raise PrunerError(f"{message} (see `{self.prog} --help`)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="`embedded`, a local checkpoint directory, or a hub id")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a hub model (off by default)")
    p.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="spread a model bigger than one device over the GPUs, offloading to the CPU (then disk) "
                        "where they are full (accelerate); the pruned model is built and saved from the CPU")
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: folder for weights offloaded to disk "
                                                          "(default: a temporary folder in the cache)")


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


def _dynamic_args(p: argparse.ArgumentParser, eval_flags: bool) -> None:
    """Probe Pruning at inference (`--dynamic probe`), for eval and generate."""
    from .probe import VARIANTS

    group = p.add_argument_group("dynamic pruning (--dynamic probe: Probe Pruning, per batch at inference)")
    group.add_argument("--dynamic", choices=["probe"], default=None, help="prune each batch on the fly with Probe Pruning")
    group.add_argument("--ratio", type=float, default=None,
                       help="share of query heads and MLP channels removed (layers 0-2 stay dense, the rest remove more)")
    group.add_argument("--probe-variant", choices=VARIANTS, default="probe",
                       help="probe: the method; full-batch: the whole batch is the probe (the oracle); "
                            "fixed: fixed fusion weights with the history")
    group.add_argument("--calib-windows", type=int, default=128,
                       help="calibration windows (train split of --data) for the probe history and static baselines")
    group.add_argument("--seed", type=int, default=0)
    if eval_flags:
        group.add_argument("--baselines", nargs="*", default=[], metavar="METHOD",
                           help="static methods (e.g. flap wanda-sp) pruned at the same ratio and timed on the same batches")
    else:
        group.add_argument("--data", default="brown", help="corpus whose train split calibrates the probe history")


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS

    parser = Parser(prog="python -m pruner", description="Structural pruning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("setup", help="prepare the embedded model and corpus (idempotent)")

    p = sub.add_parser("info", help="architecture, head counts and parameter counts of a model")
    _model_args(p)
    p.add_argument("--granularity", default="auto", help=f"unit granularity: {', '.join(GRANULARITIES)}")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="perplexity on non-overlapping windows")
    _model_args(p)
    p.add_argument("--data", default="brown", help="brown (embedded), wikitext2, c4, or a path to a text file")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true")
    _dynamic_args(p, eval_flags=True)

    p = sub.add_parser("prune", help="prune, slice and save a model")
    _model_args(p)
    p.add_argument("--method", default="magnitude", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--ratio", type=float, default=None, help="fraction of decoder-linear parameters to remove, in (0, 1)")
    p.add_argument("--granularity", default=None, help=f"structured methods: one of {', '.join(GRANULARITIES)} "
                   "(default auto: kv_group where every layer has at least two k/v heads, else query_head)")
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
    p.add_argument("--wanda-sp-stats", choices=WANDA_SP_STATS, default=None,
                   help="wanda-sp: input norms from the dense model (dense, default) or layer by layer through "
                        "the already-pruned layers (sequential, as the reference code does)")
    p.add_argument("--reconstruct", choices=RECONSTRUCT, default="none",
                   help="structured methods: refit the kept columns of o_proj and down_proj and their bias "
                        "on sequential calibration inputs after the mask is chosen (ls: least squares, "
                        "admm: the ADMM fixed-mask update; default none)")
    p.add_argument("--refit-damp", type=float, default=None,
                   help="--reconstruct: the refit's damping, a ridge towards the original weights (ls: this "
                        "fraction of the kept inputs' mean variance; admm: of each input's own variance; default: "
                        f"{REFIT_DAMP:g})")
    _pg_args(p.add_argument_group("policy gradient (--method pg)"))

    p = sub.add_parser("generate", help="greedy generation from a prompt")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--json", action="store_true")
    _dynamic_args(p, eval_flags=False)
    return parser


def check_model_args(args):
    """The model spec, device and dtype checked without loading anything (PrunerError if bad);
    returns the model's config when it can be read alone (a local folder), else None. Every
    command that loads a model calls this first, so transformers is quiet before it is used."""
    from .models import pick_device, pick_dtype, read_config

    args.cleanup.enter_context(quiet_libraries())
    pick_dtype(args.dtype, pick_device(args.device))
    return read_config(args.model, args.trust_remote_code)


def _load(args):
    from .dispatch import parse_max_memory
    from .models import load_model

    if args.device_map is None and (args.max_memory or args.offload_folder):
        raise PrunerError("--max-memory and --offload-folder go with --device-map auto")
    return load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      device_map=args.device_map, max_memory=parse_max_memory(args.max_memory),
                      offload_folder=args.offload_folder)


def at_least(value: int | None, low: int, flag: str) -> None:
    if value is not None and value < low:
        raise PrunerError(f"{flag} must be at least {low}, got {value}")


def cmd_setup(args) -> dict:
    from .assets import setup

    return setup()


def cmd_info(args) -> dict:
    from .models import model_summary
    from .space import check_granularity

    check_granularity(args.granularity)
    check_model_args(args)
    return model_summary(_load(args), args.granularity) | {"model": args.model}


def cmd_eval(args) -> dict:
    from .corpus import check_corpus, load_text
    from .evaluate import check_context, perplexity
    from .methods import get_method
    from .windows import corpus_windows

    at_least(args.seqlen, 2, "--seqlen")
    at_least(args.max_windows, 1, "--max-windows")
    at_least(args.batch_size, 1, "--batch-size")
    probe = _probe_config(args)
    for method in args.baselines:
        get_method(method)
    check_corpus(args.data)
    config = check_model_args(args)
    check_context(config, args.seqlen, "--seqlen")
    load_text(args.data, args.split)  # a missing or bad corpus fails before the model loads
    loaded = _load(args)
    check_context(loaded.model.config, args.seqlen, "--seqlen")
    windows = corpus_windows(loaded.tokenizer, args.data, args.split, args.seqlen, args.max_windows)
    if probe is not None:
        from .probe import dynamic_eval

        result = dynamic_eval(loaded, windows, probe, args.batch_size, args.baselines, progress=True)
    else:
        result = perplexity(loaded.model, windows, args.batch_size, progress=True)
    return result | {"data": args.data, "split": args.split, "model": args.model}


def _probe_config(args):
    """The ProbeConfig of --dynamic probe (PrunerError without --ratio or with bad values)."""
    from .probe import ProbeConfig

    if not args.dynamic:
        if args.ratio is not None or getattr(args, "baselines", None):
            raise PrunerError("--ratio and --baselines act with --dynamic probe only (to prune a model, use `prune`)")
        return None
    if args.ratio is None:
        raise PrunerError("--dynamic probe needs --ratio: the share of heads and channels to remove, e.g. --ratio 0.4")
    return ProbeConfig(ratio=args.ratio, variant=args.probe_variant, data=args.data, calib_windows=args.calib_windows,
                       seed=args.seed).validate()


def prune_config_from_args(args, write: bool = True):
    """A PruneConfig from the flags, or, with --resume, from the run's checkpointed settings.
    `write=False` (ranks other than 0) leaves the folders alone: rank 0 has recovered them."""
    from .config import PruneConfig
    from .fileio import recover
    from .methods import check_config, get_method
    from .models import RUN_SUBDIR
    from .pg.checkpoint import read_settings
    from .pg.config import PGConfig, pg_fields
    from .sparsity_masks import parse_sparsity_type

    if args.resume:
        run_dir = Path(args.resume)
        if write:
            recover(run_dir.parent)  # a save killed midway may have left the folder aside
            recover(run_dir)
        if not run_dir.is_dir():
            raise PrunerError(f"no run folder at {run_dir}: give the `run` folder of an interrupted search")
        settings = read_settings(run_dir)
        args.model = settings.get("model", args.model)
        try:
            config = PruneConfig.from_dict({k: v for k, v in settings.items() if k not in ("model", "run_dir")})
        except PrunerError as exc:
            raise PrunerError(f"the settings recorded in {run_dir} are not usable ({exc}): start a new run") from None
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
    elif args.run_dir:
        raise PrunerError(f"--run-dir holds a search's checkpoints: it applies only to --method pg, not {args.method}")
    chosen = {k: v for k, v in (("admm_mask", args.admm_mask), ("admm_iterations", args.admm_iterations),
                                ("wanda_sp_stats", args.wanda_sp_stats), ("refit_damp", args.refit_damp))
              if v is not None}
    return check_config(PruneConfig(method=args.method, ratio=ratio, granularity=args.granularity or "auto",
                                    data=args.data, seed=args.seed, calib_windows=args.calib_windows, pg=pg,
                                    run_dir=run_dir, sparsity_type=sparsity_type, reconstruct=args.reconstruct,
                                    **chosen))


def _check_flags(args, method) -> None:
    """Flags that do not fit the method: a one-line error instead of being ignored."""
    if args.sparsity_type is not None and not method.sparse:
        raise PrunerError(f"--sparsity-type is for the methods that zero single weights (admm, sparsegpt, wanda, "
                          f"magnitude-unstructured); {method.name} removes whole heads and channels")
    if method.sparse and args.granularity is not None:
        raise PrunerError(f"--granularity chooses the units a structured method removes; {method.name} zeroes "
                          "single weights (choose the pattern with --sparsity-type)")
    if args.wanda_sp_stats is not None and method.name != "wanda-sp":
        raise PrunerError(f"--wanda-sp-stats is a setting of --method wanda-sp, not of {method.name}")
    if args.admm_mask is not None and method.name != "admm":
        raise PrunerError(f"--admm-mask is a setting of --method admm, not of {method.name}")
    if args.refit_damp is not None and args.reconstruct == "none":
        raise PrunerError("--refit-damp is a setting of --reconstruct ls or admm")
    if args.admm_iterations is not None and method.name != "admm" and args.reconstruct != "admm":
        raise PrunerError("--admm-iterations is a setting of --method admm and of --reconstruct admm")


def cmd_prune(args) -> dict | None:
    """Prune and save. Under torchrun / accelerate launch every rank runs this: the ranks share the
    policy-gradient search (pruner.distributed) and rank 0 alone prepares, checkpoints and saves;
    the other ranks return None (they print nothing)."""
    from .corpus import check_corpus
    from .fileio import check_writable
    from .methods import get_method
    from .models import prepare_output_dir, save_pruned
    from .prune import prune, select

    group = _join_ranks(args)
    out = Path(args.out)
    if group.is_main:  # checks first, then rank 0 alone recovers and prepares the folders
        config = prune_config_from_args(args)
        try:
            check_model_args(args)
        except PrunerError as exc:
            if not args.resume:
                raise
            raise PrunerError(f"the run in {args.resume} pruned the model {args.model!r}, which cannot be used here: {exc}") from None
        overwrite = args.overwrite or bool(args.resume and Path(args.resume).parent == out)
        prepare_output_dir(out, overwrite)
        if config.run_dir:
            check_writable(Path(config.run_dir))
        if get_method(config.method).uses_data:
            check_corpus(config.data)
    group.barrier()  # rank 0 has recovered and checked the folders before the others read them
    if not group.is_main:
        check_model_args(args)
        config = prune_config_from_args(args, write=False)
    loaded = _load(args)
    if not group.is_main:
        select(loaded, config)  # this rank's share of the search; rank 0 slices and saves
        return None
    pruned, _, report = prune(loaded, config)
    save_pruned(pruned, loaded.tokenizer, out, report, overwrite)
    return report | {"out": str(out)} | ({"world_size": group.world} if group.world > 1 else {})


def _join_ranks(args):
    """Join the launcher's process group when there is one (gloo on CPU, NCCL on CUDA); with
    --device auto or cuda each rank takes the CUDA device of its local rank."""
    from . import distributed
    from .models import pick_device

    if not distributed.launched():
        return distributed.current()
    if args.device_map is not None:
        raise PrunerError("--device-map spreads one model over the devices of one process; across processes "
                          "(torchrun) every rank holds the whole model on its own device")
    import torch

    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        args.device = f"cuda:{distributed.local_rank()}"  # one device per rank
    elif args.device == "auto":
        args.device = "cpu"
    return distributed.init_from_env(pick_device(args.device))


def cmd_generate(args) -> dict:
    from .corpus import check_corpus
    from .evaluate import check_context, generate

    if not args.prompt.strip():
        raise PrunerError("--prompt is empty: give some text to continue")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    probe = _probe_config(args)
    if probe is not None:
        check_corpus(args.data)  # the probe history calibrates on its train split
    config = check_model_args(args)
    check_context(config, args.max_new_tokens + 1, "--max-new-tokens plus a prompt")
    loaded = _load(args)
    n_prompt = len(loaded.tokenizer(args.prompt)["input_ids"])
    check_context(loaded.model.config, n_prompt + args.max_new_tokens, "the prompt plus --max-new-tokens")
    if probe is not None:
        from .probe import GENERATION_HISTORY_SEQLEN, build_pruner

        pruner = build_pruner(loaded, probe, GENERATION_HISTORY_SEQLEN)
        completion = pruner.generate(loaded.tokenizer, args.prompt, args.max_new_tokens)
        record = pruner.records[-1]
        return {"prompt": args.prompt, "completion": completion, "dynamic": "probe", "ratio": args.ratio,
                "achieved_ratio": pruner.achieved_ratio(record),
                "kept_query_heads": {l: h.numel() for l, h in record.heads.items()},
                "kept_mlp_channels": {l: c.numel() for l, c in record.channels.items()}}
    return {"prompt": args.prompt, "completion": generate(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens)}


COMMANDS = {"setup": cmd_setup, "info": cmd_info, "eval": cmd_eval, "prune": cmd_prune, "generate": cmd_generate}


@contextlib.contextmanager
def quiet_libraries():
    """transformers' logs and its load / save bars off for one command (on an error path they would
    come before the one error line), as they were after it. Our own progress (perplexity,
    calibration, the search) still shows."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .distributed import shutdown

    with warnings.catch_warnings(record=True) as caught, contextlib.ExitStack() as cleanup:
        try:
            args = build_parser().parse_args(argv)
            args.cleanup = cleanup  # what a command changes for its own run (quiet_libraries) is undone after it
            result = COMMANDS[args.command](args)
        except PrunerError as exc:
            print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr)
            return 2
        finally:
            shutdown()
    for w in caught:  # after the work, so that an error is the only line an error prints
        print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno).rstrip(), file=sys.stderr)
    if result is None:  # a rank other than 0: rank 0 reports
        return 0
    if getattr(args, "json", False):
        print(json.dumps(result))
    elif args.command == "generate":
        print(result["completion"])
    else:
        print(json.dumps(result, indent=2))
    return 0
