"""A policy-gradient search as a lifecycle: the loop, pause / resume / stop, history, checkpoints.

One step (Gao et al., as the reference scripts run it; the math is pruner.pg_math.pg_step):
    batch   <- next B calibration blocks
    m_1..K  ~ Bernoulli(s)                  fresh masks (independent, or antithetic pairs); each runs on its kept weights (gathered),
                                            or all K in one batched masked forward
    L_j     =  mean token cross-entropy of the model under m_j    (no autograd)
    s       <- Project(s - lr_t g)          g from pg_step; cosine lr_t; budget per kind or joint
A hard mask keeps the units of largest s under the same budget (pruner.budget.hard_mask). The search
returns (result=best) the hard mask with the lowest perplexity on calibration blocks held out of the
search, among those scored: the start, every eval_every steps and the end; or (result=last) the final
one. The held-out blocks are never a batch, and the validation split is only watched, never chosen on.

A `PGRun` reports its status through `on_status(run)`; it never writes a run record itself.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .. import distributed, pg_math
from ..budget import hard_mask, keep_fraction, project_probs
from ..dispatch import model_device
from ..errors import PrunerError
from ..evaluate import window_losses
from ..gathered import gathered, resolve_forward_mode
from ..masking import masked, stack_masks
from ..space import Mask, PruningSpace
from ..windows import text_length, with_bos
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import PGConfig
from .history import RunHistory


def training_blocks(ids: Tensor, seqlen: int, seed: int, bos: int | None = None) -> Tensor:
    """Non-overlapping blocks of the calibration token stream (BOS first where the tokenizer adds
    one), shuffled with `seed` (reference: C4 chunked into 128-token blocks, shuffled with a fixed
    seed); step t reads the next B."""
    length = text_length(seqlen, bos)
    n = ids.numel() // length
    if n < 1:
        raise PrunerError(f"calibration text too short: {ids.numel()} tokens, fewer than one block of {seqlen}")
    blocks = with_bos(ids[: n * length].view(n, length), bos)
    return blocks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def hold_out(blocks: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
    """(search blocks, held-out blocks): the last `n` shuffled blocks are set aside, never a batch.
    n = 0 holds out nothing (None)."""
    if n == 0:
        return blocks, None
    if len(blocks) <= n:
        raise PrunerError(f"calibration text too short: {len(blocks)} blocks, but {n} are held out to choose the "
                          "result and the search needs at least one more (lower holdout_blocks, or use result=last)")
    return blocks[:-n], blocks[-n:]


class PGRun:
    """A policy-gradient search that can run in a background thread, be paused, resumed,
    stopped, killed and resumed from its last checkpoint.

    `blocks` (N, seqlen) are the shuffled calibration blocks the steps read; `valid` (W, seqlen) the
    validation windows whose hard-mask perplexity is watched (history "evals"); `holdout` (H, seqlen)
    calibration blocks the steps never read, on which hard masks are scored to choose the result
    (`best`: step, perplexity and flat mask of the best so far). `init_scores` are per-layer metric scores for the
    initialisation (ignored for `random`). `fill`: calibration means of the o_proj/down_proj
    inputs; with `config.bias_compensation` removed channels take them in every scored forward
    (pruner.masking). With `run_dir`, checkpoints go there; `settings` travel with them.
    Under torch.distributed every rank runs the same PGRun and computes a share of each step's
    forwards (pruner.distributed); only rank 0 writes checkpoints.
    """

    def __init__(self, model, adapter, space: PruningSpace, ratio: float, config: PGConfig, seed: int,
                 blocks: Tensor, valid: Tensor, init_scores: tuple[list[Tensor], list[Tensor]] | None = None,
                 run_dir: Path | None = None, settings: dict | None = None,
                 fill: tuple[list[Tensor], list[Tensor]] | None = None,
                 on_status: Callable[["PGRun"], None] | None = None, holdout: Tensor | None = None):
        self.model, self.adapter, self.space = model, adapter, space
        self.device = model_device(model)
        self.group = distributed.current()
        if config.bias_compensation and fill is None:
            raise PrunerError("bias_compensation needs the calibration means of the o_proj/down_proj inputs")
        self.fill = tuple([t.to(self.device) for t in part] for part in fill) if config.bias_compensation else None
        self.ratio, self.keep, self.config, self.seed = ratio, keep_fraction(ratio), config.validate(), seed
        self.blocks, self.valid, self.holdout = blocks, valid, holdout
        if self.config.result == "best" and (holdout is None or len(holdout) == 0):
            raise PrunerError("result=best needs held-out calibration blocks to choose on")
        self.best: dict | None = None
        self.run_dir = Path(run_dir) if run_dir else None
        self.settings = settings or {}
        self.on_status = on_status
        self.costs = space.unit_costs()
        self._status = "created"
        self.error: str | None = None
        self._pause, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self.history = RunHistory()
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.baseline: float | None = None
        self.s_h, self.s_c = self._initial_probs(init_scores)

    # -- state ------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @status.setter
    def status(self, value: str) -> None:
        changed = value != self._status
        self._status = value
        if changed and self.on_status:
            self.on_status(self)

    def _initial_probs(self, init_scores) -> tuple[Tensor, Tensor]:
        cfg, space = self.config, self.space
        gen = torch.Generator().manual_seed(self.seed + 1)
        heads, chans = [], []
        for l in range(space.n_layers):
            h_metric = init_scores[0][l] if init_scores else torch.zeros(space.n_head_units(l))
            c_metric = init_scores[1][l] if init_scores else torch.zeros(space.n_channel_units(l))
            heads.append(pg_math.init_probs(h_metric, self.keep, cfg.init, cfg.init_const, gen))
            chans.append(pg_math.init_probs(c_metric, self.keep, cfg.init, cfg.init_const, gen))
        return self.project(torch.cat(heads), torch.cat(chans))

    def project(self, s_h: Tensor, s_c: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        return project_probs(self.space, s_h, s_c, self.keep, cfg.budget, cfg.scope, self.costs, cfg.prob_floor)

    def expected_kept_fraction(self) -> float:
        """E[kept decoder-linear params] / all of them, under the current probabilities."""
        c_h, c_c = self.costs
        total = self.space.decoder_linear_params()
        fixed = total - float(c_h.sum() + c_c.sum())
        return (float((c_h * self.s_h).sum() + (c_c * self.s_c).sum()) + fixed) / total

    def current_mask(self) -> Mask:
        return hard_mask(self.space, self.s_h, self.s_c, self.keep, self.config.budget, self.config.scope)

    def result_mask(self) -> Mask:
        """The mask the search returns: the best scored on the held-out blocks (result=best; the
        current one before any was scored), or the current hard mask (result=last)."""
        if self.config.result == "best" and self.best is not None:
            flat = self.best["mask"]
            n_h = len(self.s_h)
            probs = self.space.unflatten(flat[:n_h], flat[n_h:])
            return Mask(tuple(t.clone() for t in probs.heads), tuple(t.clone() for t in probs.channels))
        return self.current_mask()

    def probabilities(self) -> Mask:
        """Per-layer keep probabilities, as a Mask of floats (for heatmaps)."""
        return self.space.unflatten(self.s_h.float(), self.s_c.float())

    # -- one step -------------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast for "bf16", and for "auto" on CUDA; CPU bf16 matmuls were several times
        slower than fp32 on the 2-core machines measured (bench/results/pg_speed.md)."""
        cfg = self.config
        use_bf16 = cfg.forward_dtype == "bf16" or (cfg.forward_dtype == "auto" and self.device.type == "cuda")
        if not use_bf16 or next(self.model.parameters()).dtype != torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def forward_mode(self) -> str:
        """The config's forward mode with `auto` resolved for this run's device."""
        return resolve_forward_mode(self.config.forward_mode, self.device)

    def _under(self, mask: Mask):
        """The forward of one (unbatched) mask as the config says: gathered or masked."""
        run_on = gathered if self.forward_mode == "gathered" else masked
        return run_on(self.model, self.adapter, self.space, mask, self.fill)

    @torch.no_grad()
    def sample_losses(self, masks: Tensor, batch: Tensor) -> Tensor:
        """Losses of K masks (K, N_units) on one batch (B, T): per mask, the mean over the batch of
        each sequence's mean token cross-entropy. gathered: one forward of B sequences per mask on
        its kept weights; masked: one forward of K*B sequences under batched masks. Across ranks
        each computes its share of the K*B (mask, sequence) pairs; one all-reduce sums the table."""
        k, b = masks.shape[0], batch.shape[0]
        n_h = len(self.s_h)
        per_mask = [self.space.unflatten(m[:n_h], m[n_h:]) for m in masks]
        ids = batch.to(self.device)
        table = torch.zeros(k * b, dtype=torch.float64)
        mine = list(self.group.share(k * b))  # pair i: mask i // b on sequence i % b
        if mine and self.forward_mode == "gathered":
            for j in sorted({i // b for i in mine}):
                rows = [i for i in mine if i // b == j]
                with self._autocast(), self._under(per_mask[j]):
                    table[rows] = window_losses(self.model, ids[[i % b for i in rows]]).double().cpu()
        elif mine:
            with self._autocast(), masked(self.model, self.adapter, self.space,
                                          stack_masks([per_mask[i // b] for i in mine]), self.fill):
                table[mine] = window_losses(self.model, ids[[i % b for i in mine]]).double().cpu()
        return self.group.sum(table).view(k, b).mean(1)

    def batch_at(self, step: int) -> Tensor:
        b = self.config.batch_size
        idx = (torch.arange(b) + step * b) % len(self.blocks)
        return self.blocks[idx]

    def do_step(self) -> dict:
        """Sample, score, update, project; returns the step's record. A non-finite loss or
        probability stops the search with a PrunerError (nothing is saved from a broken state)."""
        cfg = self.config
        t0 = time.perf_counter()
        s = torch.cat([self.s_h, self.s_c])
        masks = pg_math.sample_masks(s, cfg.samples, self.generator, cfg.sampling)  # (K, N)
        losses = self.sample_losses(masks.float(), self.batch_at(self.step))
        if not torch.isfinite(losses).all():
            raise PrunerError(f"step {self.step + 1}: a sampled mask gave a non-finite loss ({losses.tolist()}); "
                              "the search stopped (try forward_dtype fp32)")
        lr = pg_math.cosine_lr(self.step, cfg.steps, cfg.lr)
        s_new, baseline, per_sample = pg_math.pg_step(
            s, masks, losses, self.baseline, lr, estimator=cfg.estimator, window=cfg.window,
            baseline_kind=cfg.baseline, penalty=cfg.penalty, lr0=cfg.lr, sampling=cfg.sampling)
        if not torch.isfinite(s_new).all():
            raise PrunerError(f"step {self.step + 1}: the update made keep probabilities non-finite (lr {lr:g}, "
                              f"penalty {cfg.penalty:g}); the search stopped: lower the learning rate or penalty")
        n_h = len(self.s_h)
        self.s_h, self.s_c = self.project(s_new[:n_h], s_new[n_h:])
        self.baseline = baseline
        elapsed = time.perf_counter() - t0
        self.step += 1
        record = {
            "step": self.step,
            "losses": [float(x) for x in losses],
            "loss_mean": float(losses.mean()),
            "baseline": self.baseline,
            "grad_variance": pg_math.gradient_variance(per_sample),
            "grad_mean_square": pg_math.mean_square(per_sample),
            "lr": lr,
            "expected_kept_fraction": self.expected_kept_fraction(),
            "target_kept_fraction": self.keep,
            "tokens_per_s": cfg.samples * cfg.batch_size * cfg.seqlen / elapsed,
            "step_time_s": elapsed,
            "time": time.time(),
        }
        for name, probs in (("heads", self.s_h), ("channels", self.s_c)):
            record[f"{name}_mean"] = float(probs.mean())
            record[f"{name}_min"] = float(probs.min())
            record[f"{name}_max"] = float(probs.max())
            record[f"{name}_entropy"] = pg_math.entropy(probs)
        return record

    def evaluate_hard_mask(self, windows: Tensor | None = None, mask: Mask | None = None) -> float:
        """Perplexity of `mask` (default: the current hard mask) on `windows` (default: the
        validation windows), each rank its share."""
        windows = self.valid if windows is None else windows
        mine = self.group.share(len(windows))
        total = torch.zeros(2, dtype=torch.float64)  # sum of window losses, windows
        with self._autocast(), self._under(self.current_mask() if mask is None else mask):
            for start in range(mine.start, mine.stop, 8):
                losses = window_losses(self.model, windows[start:min(start + 8, mine.stop)]).double().cpu()
                total += torch.stack([losses.sum(), torch.tensor(float(len(losses)), dtype=torch.float64)])
        total = self.group.sum(total)
        return math.exp(float(total[0] / total[1]))

    def score_on_holdout(self, mask: Mask | None = None) -> float | None:
        """Held-out perplexity of `mask` (default: the current hard mask); it becomes `best` when lower
        than the best so far (ties keep the earlier). None without held-out blocks."""
        if self.holdout is None:
            return None
        mask = self.current_mask() if mask is None else mask
        ppl = self.evaluate_hard_mask(self.holdout, mask)
        if self.best is None or ppl < self.best["ppl"]:
            self.best = {"step": self.step, "ppl": ppl, "mask": torch.cat([*mask.heads, *mask.channels]).bool()}
        return ppl

    def _evaluate(self) -> None:
        mask = self.current_mask()  # one hard mask, scored on validation and on the held-out blocks
        entry = {"step": self.step, "ppl": self.evaluate_hard_mask(mask=mask)}
        holdout = self.score_on_holdout(mask)
        if holdout is not None:
            entry |= {"holdout_ppl": holdout, "best_step": self.best["step"], "best_holdout_ppl": self.best["ppl"]}
        self.history.append("evals", entry)

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write everything needed to continue the same trajectory, atomically (rank 0 only)."""
        if self.run_dir is None or not self.group.is_main:
            return
        save_checkpoint(self.run_dir, Checkpoint(
            step=self.step, s_h=self.s_h, s_c=self.s_c, baseline=self.baseline,
            generator=self.generator.get_state(), config=dataclasses.asdict(self.config), ratio=self.ratio,
            seed=self.seed, settings=self.settings, status=self.status, history=self.history.read(),
            best=self.best))
        if self.on_status:
            self.on_status(self)

    def load_checkpoint(self) -> bool:
        """Continue from run_dir's checkpoint if there is one; True if loaded."""
        ckpt = load_checkpoint(self.run_dir) if self.run_dir else None
        if ckpt is None:
            return False
        if ckpt.config != dataclasses.asdict(self.config) or ckpt.ratio != self.ratio or ckpt.seed != self.seed:
            raise PrunerError(f"the checkpoint in {self.run_dir} belongs to a run with other settings; "
                              "use a new run directory")
        if ckpt.s_h.shape != self.s_h.shape or ckpt.s_c.shape != self.s_c.shape or ckpt.step > self.config.steps:
            raise PrunerError(f"the checkpoint in {self.run_dir} does not fit this model's units; use a new run directory")
        try:
            self.generator.set_state(ckpt.generator)
        except RuntimeError:
            raise PrunerError(f"the checkpoint in {self.run_dir} is damaged: bad generator state") from None
        if ckpt.best is not None and ckpt.best["mask"].numel() != len(self.s_h) + len(self.s_c):
            raise PrunerError(f"the checkpoint in {self.run_dir} does not fit this model's units; use a new run directory")
        self.step, self.s_h, self.s_c, self.baseline = ckpt.step, ckpt.s_h, ckpt.s_c, ckpt.baseline
        self.best = ckpt.best
        h = ckpt.history
        self.history = RunHistory(h["steps"], h["snapshots"], h["evals"])
        return True

    # -- control --------------------------------------------------------------------------
    def _snapshot(self) -> None:
        probs = self.probabilities()
        self.history.append("snapshots", {"step": self.step, "heads": [t.clone() for t in probs.heads],
                                          "channels": [t.clone() for t in probs.channels]})

    def run(self, progress: Callable[[dict], None] | None = None) -> None:
        """The loop, in the calling thread. `progress(record)` is called after every step."""
        cfg = self.config
        self.status = "running"
        try:
            if self.step == 0 and not self.history.snapshots:
                self._snapshot()
            if self.best is None:
                self.score_on_holdout()  # the start is a candidate
            while self.step < cfg.steps:
                while self._pause.is_set() and not self._stop.is_set():
                    self.status = "paused"
                    self._stop.wait(0.05)
                if self._stop.is_set():
                    self.status = "stopped"
                    self.checkpoint()
                    return
                self.status = "running"
                record = self.do_step()
                self.history.append("steps", record)
                if self.step % cfg.snapshot_every == 0 or self.step == cfg.steps:
                    self._snapshot()
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
                if progress:
                    progress(record)
            self._status = "finished"
            self.checkpoint()
        except Exception as exc:  # noqa: BLE001 - a failed run keeps its reason for the UI
            self.error = str(exc) if isinstance(exc, PrunerError) else traceback.format_exc()
            self.status = "failed"
            raise

    def start(self, on_exit: Callable[["PGRun"], None] | None = None) -> threading.Thread:
        """Run (or continue after a stop) in a background daemon thread; `on_exit(self)` is called
        in that thread when the loop ends (finished, stopped or failed). Returns the thread."""
        if self._thread and self._thread.is_alive():
            raise PrunerError("this run is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_quietly, args=(on_exit,), name="pg-run", daemon=True)
        self._thread.start()
        return self._thread

    def _run_quietly(self, on_exit) -> None:
        try:
            self.run()
        except Exception:  # noqa: BLE001 - recorded in status/error by run()
            pass
        if on_exit:
            on_exit(self)

    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()

    def stop(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive())
