"""Policy gradient (Gao et al., arXiv 2406.10576): learn a keep probability per unit from forward
passes only. This file builds a search from a model and a corpus and turns its result into a
Selection; the loop itself is pruner.pg.run, the math pruner.pg_math."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .. import distributed
from ..calibration import calibration_stats, input_means
from ..pg.run import PGRun, hold_out, training_blocks
from ..run_record import RunRecord
from ..space import PruningSpace
from ..windows import bos_id, corpus_ids, corpus_windows
from . import flap, magnitude, taylor, wanda_sp
from .base import Method, Selection, UnitScores

INIT_METHODS: dict[str, Method] = {m.name: m for m in (flap.METHOD, wanda_sp.METHOD, taylor.METHOD, magnitude.METHOD)}


def settings_of(loaded, config) -> dict:
    """What a run folder records about its run: the model and the whole PruneConfig."""
    return {"model": loaded.spec, **config.to_dict()}


def build_run(loaded, space: PruningSpace, config, run_dir: Path | None = None,
              on_status: Callable[[PGRun], None] | None = None) -> PGRun:
    """Tokenise the corpus, compute the init metric, and create a run, continued from run_dir's
    checkpoint when there is one."""
    pg = config.pg
    blocks, holdout = hold_out(training_blocks(corpus_ids(loaded.tokenizer, config.data, "train"), pg.seqlen,
                                               config.seed, bos_id(loaded.tokenizer)), pg.holdout_blocks)
    valid = corpus_windows(loaded.tokenizer, config.data, "validation", pg.seqlen, pg.eval_windows)
    init_scores: UnitScores | None = None
    if pg.init == "mask":  # the metric method's own mask at this ratio, as 1 kept / 0 removed
        mask = INIT_METHODS[pg.init_metric].select(loaded, space, config).mask
        init_scores = [h.float() for h in mask.heads], [c.float() for c in mask.channels]
    elif pg.init != "random":
        init_scores = INIT_METHODS[pg.init_metric].unit_scores(loaded, space, config)
    fill = input_means(calibration_stats(loaded, config)) if pg.bias_compensation else None
    run = PGRun(loaded.model, loaded.adapter, space, config.ratio, pg, config.seed, blocks, valid, init_scores,
                run_dir, settings_of(loaded, config), fill, on_status, holdout)
    run.load_checkpoint()
    return run


def record_status(record: RunRecord) -> Callable[[PGRun], None]:
    """An `on_status` callback that keeps a run folder's record in step with the search."""
    def report(run: PGRun) -> None:
        record.write(status=run.status, step=run.step, steps=run.config.steps, error=run.error)
    return report


def selection_of(run: PGRun) -> Selection:
    """The run's result mask (`PGRun.result_mask`: the best on held-out blocks, or the last);
    compensated when the search scored masks so."""
    history = run.history.read()
    best = run.best if run.config.result == "best" else None
    return Selection(run.result_mask(), compensate=run.config.bias_compensation, extra={"pg": {
        "steps": run.step,
        "final_loss_mean": history["steps"][-1]["loss_mean"] if history["steps"] else None,
        "validation_ppl": history["evals"],
        "result": run.config.result,
        "best_step": best["step"] if best else None,
        "holdout_ppl": best["ppl"] if best else None,
        "run_dir": str(run.run_dir) if run.run_dir else None,
    }})


def select(loaded, space: PruningSpace, config) -> Selection:
    """Run (or continue) a search in the foreground with a progress bar; its record in run_dir.
    Across processes (pruner.distributed) rank 0 alone keeps the record and shows the bar."""
    run_dir = Path(config.run_dir) if config.run_dir else None
    main = distributed.current().is_main
    on_status = record_status(RunRecord(run_dir, settings_of(loaded, config))) if run_dir and main else None
    run = build_run(loaded, space, config, run_dir, on_status)
    if run_dir and main:
        tqdm.write(f"checkpoints in {run_dir}: continue an interrupted run with --resume {run_dir}", file=sys.stderr)
    bar = tqdm(total=run.config.steps, initial=run.step, desc="policy gradient", unit="step", disable=not main)

    def progress(record: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss_mean']:.3f}", kept=f"{record['expected_kept_fraction']:.3f}")

    try:
        run.run(progress)
    finally:
        bar.close()
    return selection_of(run)


METHOD = Method("pg", "policy-gradient search over Bernoulli keep probabilities (forward passes only)", select)
