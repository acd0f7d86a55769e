"""Policy-gradient pruning runs: the loop, its watchable history, checkpoints, pause/resume/stop.

One step (algorithm of Gao et al., as the reference scripts run it):
    batch   <- next B calibration blocks
    m_1..K  ~ Bernoulli(s)                  fresh masks, all K run in one batched forward
    L_j     =  mean token cross-entropy of the model under m_j    (no autograd, `no_grad`)
    delta   <- moving average of the losses (window T), updated before the gradient
    g       =  1/(K-1) sum_j (L_j - delta) score(m_j, s)   (+ optional log-odds penalty)
    s       <- Project(s - lr_t g)          cosine lr_t, budget per kind or joint, global or per layer
The final hard mask keeps the units of largest s under the same budget.

A `PGRun` executes this in a background thread and exposes a lock-protected, append-only
history that a UI can poll; it checkpoints atomically every N steps and resumes exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import pg_math
from .errors import PrunerError
from .masking import masked
from .paths import write_json_atomically
from .space import Mask, PruningSpace

CHECKPOINT = "checkpoint.pt"
STATUS = "status.json"
BUDGETS = ("separate", "joint")
SCOPES = ("global", "per_layer")
INIT_METRICS = ("wanda-sp", "flap", "magnitude")


@dataclass(frozen=True)
class PGConfig:
    """Knobs of the policy-gradient search; defaults sized for the embedded model on 2 CPU cores
    (about ten minutes). The reference runs 15,000 steps of 8 x 128 tokens with lr 2e-3 on 7B models."""

    steps: int = 240
    samples: int = 2  # K masks per step
    batch_size: int = 4  # sequences per mask
    seqlen: int = 128
    lr: float = 0.01  # best of 0.01 / 0.05 / 0.2 on the embedded model (bench/results/pg_tuning_*.md)
    window: int = 5  # T of the moving-average baseline
    use_baseline: bool = True
    estimator: str = "reference"  # or "exact"
    budget: str = "separate"  # heads and channels each keep (1 - ratio), or one "joint" parameter budget
    scope: str = "global"  # or "per_layer"
    init: str = "sigmap"  # sigmap | const | norm | random
    init_metric: str = "flap"  # metric behind sigmap/const/norm (FLAP scored best on the embedded model)
    init_const: float = 0.9
    penalty: float = 0.0  # lambda_0 of the log-odds penalty, decayed with the lr schedule
    prob_floor: float = 0.01  # s stays in [floor, 1 - floor] (budget kept exactly); 0 = reference
    forward_dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    # Score masks, and save the result, with FLAP's bias compensation (removed channels take their
    # calibration mean): not in the reference (False), and far better (bench/results/quality_cpu.md).
    bias_compensation: bool = True
    eval_every: int = 40
    eval_windows: int = 16
    snapshot_every: int = 10
    checkpoint_every: int = 20

    def validate(self) -> "PGConfig":
        checks = [
            (self.steps >= 1, "steps must be at least 1"),
            (self.samples >= 2, "samples (K) must be at least 2: the estimator needs two masks per step"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.seqlen >= 2, "seqlen must be at least 2"),
            (self.lr > 0, "lr must be positive"),
            (self.window >= 1, "window (T) must be at least 1"),
            (self.estimator in pg_math.ESTIMATORS, f"estimator must be one of {', '.join(pg_math.ESTIMATORS)}"),
            (self.budget in BUDGETS, f"budget must be one of {', '.join(BUDGETS)}"),
            (self.scope in SCOPES, f"scope must be one of {', '.join(SCOPES)}"),
            (self.init in pg_math.INITS, f"init must be one of {', '.join(pg_math.INITS)}"),
            (self.init_metric in INIT_METRICS, f"init_metric must be one of {', '.join(INIT_METRICS)}"),
            (0.5 <= self.init_const <= 1.0, "init_const must lie in [0.5, 1]"),
            (self.penalty >= 0, "penalty must be non-negative"),
            (0 <= self.prob_floor < 0.5, "prob_floor must lie in [0, 0.5)"),
            (self.forward_dtype in ("auto", "fp32", "bf16"), "forward_dtype must be auto, fp32 or bf16"),
            (min(self.eval_every, self.eval_windows, self.snapshot_every, self.checkpoint_every) >= 1,
             "eval_every, eval_windows, snapshot_every and checkpoint_every must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise PrunerError(f"bad policy-gradient setting: {message}")
        return self


# ---- budgets, projection and hard masks over the flat probability vectors ----------------

def _groups(space: PruningSpace, budget: str, scope: str) -> list[tuple[Tensor, Tensor]]:
    """Index sets that share one budget: (head indices, channel indices) per group."""
    h_sizes = [space.n_head_units(l) for l in range(space.n_layers)]
    c_sizes = [space.n_channel_units(l) for l in range(space.n_layers)]
    h_off = [0] + list(torch.tensor(h_sizes).cumsum(0).tolist())
    c_off = [0] + list(torch.tensor(c_sizes).cumsum(0).tolist())
    empty = torch.zeros(0, dtype=torch.long)
    if scope == "global":
        layer_sets = [(torch.arange(h_off[-1]), torch.arange(c_off[-1]))]
    else:
        layer_sets = [(torch.arange(h_off[l], h_off[l + 1]), torch.arange(c_off[l], c_off[l + 1]))
                      for l in range(space.n_layers)]
    if budget == "joint":
        return layer_sets
    return [g for h, c in layer_sets for g in ((h, empty), (empty, c))]


def project_probs(space: PruningSpace, s_h: Tensor, s_c: Tensor, keep: float, budget: str, scope: str,
                  costs: tuple[Tensor, Tensor], floor: float = 0.0) -> tuple[Tensor, Tensor]:
    """Project (s_heads, s_channels) so each budget group keeps at most `keep` of its unit cost
    in expectation: sum c_i s_i <= keep sum c_i, with floor <= s <= 1 - floor (pg_math.project)."""
    c_h, c_c = costs
    out_h, out_c = s_h.clone(), s_c.clone()
    for hi, ci in _groups(space, budget, scope):
        s = torch.cat([s_h[hi], s_c[ci]])
        c = torch.cat([c_h[hi], c_c[ci]])
        if s.numel() == 0:
            continue
        p = pg_math.project(s, keep * float(c.sum()), c, lo=floor, hi=1 - floor)
        out_h[hi], out_c[ci] = p[: len(hi)], p[len(hi):]
    return out_h, out_c


def hard_mask(space: PruningSpace, s_h: Tensor, s_c: Tensor, keep: float, budget: str, scope: str) -> Mask:
    """Deterministic mask: in each budget group keep units of largest s while their cost fits in
    `keep` of the group's cost; `query_head` layers are then evened out over their groups."""
    from .selection import fill_budget, top_heads

    c_h, c_c = space.unit_costs()
    keep_h = torch.zeros(len(s_h), dtype=torch.bool)
    keep_c = torch.zeros(len(s_c), dtype=torch.bool)
    for hi, ci in _groups(space, budget, scope):
        c = torch.cat([c_h[hi], c_c[ci]])
        picked = fill_budget(torch.cat([s_h[hi], s_c[ci]]), c, keep * float(c.sum()))
        keep_h[hi], keep_c[ci] = picked[: len(hi)], picked[len(hi):]
    mask = space.unflatten(keep_h, keep_c)
    if space.granularity == "query_head":
        probs = space.unflatten(s_h, s_c).heads
        mask = Mask(tuple(top_heads(space, l, probs[l], int(m.sum())) for l, m in enumerate(mask.heads)), mask.channels)
    return mask


# ---- history ------------------------------------------------------------------------------

class RunHistory:
    """Append-only record of a run, safe to read from other threads while it grows.

    steps:     one dict per step (losses, baseline, grad_variance, s statistics, lr, tokens/s, ...)
    snapshots: every `snapshot_every` steps, all probabilities per layer (for heatmaps)
    evals:     every `eval_every` steps, perplexity of the current hard mask on validation windows
    """

    def __init__(self, steps=None, snapshots=None, evals=None):
        self._lock = threading.Lock()
        self.steps: list[dict] = list(steps or [])
        self.snapshots: list[dict] = list(snapshots or [])
        self.evals: list[dict] = list(evals or [])

    def append(self, kind: str, item: dict) -> None:
        with self._lock:
            getattr(self, kind).append(item)

    def read(self, steps_since: int = 0) -> dict:
        """Copies of the lists (steps from index `steps_since` on)."""
        with self._lock:
            return {"steps": self.steps[steps_since:], "snapshots": list(self.snapshots), "evals": list(self.evals)}

    def state(self) -> dict:
        return self.read(0)


# ---- the run --------------------------------------------------------------------------------

def training_blocks(ids: Tensor, seqlen: int, seed: int) -> Tensor:
    """Non-overlapping blocks of the calibration token stream, shuffled with `seed` (reference:
    C4 chunked into 128-token blocks, shuffled with a fixed seed); step t reads the next B."""
    n = ids.numel() // seqlen
    if n < 1:
        raise PrunerError(f"calibration text too short: {ids.numel()} tokens, fewer than one block of {seqlen}")
    blocks = ids[: n * seqlen].view(n, seqlen)
    return blocks[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


class PGRun:
    """A policy-gradient search that can run in a background thread, be paused, resumed,
    stopped, killed and resumed from its last checkpoint.

    `blocks` (N, seqlen) are the shuffled calibration blocks; `valid` (W, seqlen) the held-out
    windows for hard-mask perplexity. `init_scores` are per-layer metric scores for the
    initialisation (ignored for `random`). With `run_dir`, checkpoints go there.
    """

    def __init__(self, model, adapter, space: PruningSpace, ratio: float, config: PGConfig, seed: int,
                 blocks: Tensor, valid: Tensor, init_scores: tuple[list[Tensor], list[Tensor]] | None = None,
                 run_dir: Path | None = None, settings: dict | None = None,
                 fill: tuple[list[Tensor], list[Tensor]] | None = None):
        """`fill`: calibration means of the o_proj/down_proj inputs; with `config.bias_compensation`
        removed channels take them in every scored forward (see pruner.masking)."""
        self.model, self.adapter, self.space = model, adapter, space
        if config.bias_compensation and fill is None:
            raise PrunerError("bias_compensation needs the calibration means of the o_proj/down_proj inputs")
        device = next(model.parameters()).device
        self.fill = tuple([t.to(device) for t in part] for part in fill) if config.bias_compensation else None
        self.ratio, self.keep, self.config, self.seed = ratio, 1.0 - ratio, config.validate(), seed
        self.blocks, self.valid = blocks, valid
        self.run_dir = Path(run_dir) if run_dir else None
        self.settings = settings or {}
        self.costs = space.unit_costs()
        self.device = next(model.parameters()).device
        self.status = "created"
        self.error: str | None = None
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.history = RunHistory()
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.baseline: float | None = None
        self.s_h, self.s_c = self._initial_probs(init_scores)

    # -- state ------------------------------------------------------------------------------
    def _initial_probs(self, init_scores) -> tuple[Tensor, Tensor]:
        cfg, space = self.config, self.space
        gen = torch.Generator().manual_seed(self.seed + 1)
        heads, chans = [], []
        for l in range(space.n_layers):
            h_metric = init_scores[0][l] if init_scores else torch.zeros(space.n_head_units(l))
            c_metric = init_scores[1][l] if init_scores else torch.zeros(space.n_channel_units(l))
            heads.append(pg_math.init_probs(h_metric, self.keep, cfg.init, cfg.init_const, gen))
            chans.append(pg_math.init_probs(c_metric, self.keep, cfg.init, cfg.init_const, gen))
        return project_probs(space, torch.cat(heads), torch.cat(chans), self.keep, cfg.budget, cfg.scope, self.costs,
                             cfg.prob_floor)

    def expected_kept_fraction(self) -> float:
        """E[kept decoder-linear params] / all of them, under the current probabilities."""
        c_h, c_c = self.costs
        fixed = self.space.decoder_linear_params() - float(c_h.sum() + c_c.sum())
        return (float((c_h * self.s_h).sum() + (c_c * self.s_c).sum()) + fixed) / self.space.decoder_linear_params()

    def current_mask(self) -> Mask:
        return hard_mask(self.space, self.s_h, self.s_c, self.keep, self.config.budget, self.config.scope)

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

    @torch.no_grad()
    def sample_losses(self, masks: Tensor, batch: Tensor) -> Tensor:
        """Losses of K masks (K, N_units) on one batch (B, T), in one forward of K*B sequences."""
        from .evaluate import token_nll
        from .masking import stack_masks

        k, b = masks.shape[0], batch.shape[0]
        n_h = len(self.s_h)
        per_mask = [self.space.unflatten(m[:n_h], m[n_h:]) for m in masks]
        ids = batch.to(self.device).repeat(k, 1)
        with self._autocast(), masked(self.model, self.adapter, self.space, stack_masks(per_mask, repeats=b),
                                            self.fill):
            logits = self.model(ids, use_cache=False).logits
        nll = token_nll(logits, ids).mean(1)  # (K*B,)
        return nll.view(k, b).mean(1).double().cpu()

    def batch_at(self, step: int) -> Tensor:
        b = self.config.batch_size
        idx = (torch.arange(b) + step * b) % len(self.blocks)
        return self.blocks[idx]

    def do_step(self) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        s = torch.cat([self.s_h, self.s_c])
        masks = pg_math.sample_masks(s, cfg.samples, self.generator)  # (K, N)
        losses = self.sample_losses(masks.float(), self.batch_at(self.step))
        finite = torch.isfinite(losses)
        if finite.sum() >= 2:
            masks, losses = masks[finite], losses[finite]
            if cfg.use_baseline:
                self.baseline = pg_math.update_baseline(self.baseline, losses, cfg.window)
                baseline = self.baseline
            else:
                baseline = 0.0
            per_sample = pg_math.per_sample_gradients(losses, masks, s, baseline, cfg.estimator)
            grad = per_sample.sum(0) / (len(losses) - 1)
            lr = pg_math.cosine_lr(self.step, cfg.steps, cfg.lr)
            if cfg.penalty:
                grad = grad + (lr / cfg.lr) * cfg.penalty * pg_math.log_odds_penalty(s)
            s = s - lr * grad
            n_h = len(self.s_h)
            self.s_h, self.s_c = project_probs(self.space, s[:n_h], s[n_h:], self.keep, cfg.budget, cfg.scope,
                                               self.costs, cfg.prob_floor)
            variance = pg_math.gradient_variance(per_sample)
        else:
            lr, variance = pg_math.cosine_lr(self.step, cfg.steps, cfg.lr), float("nan")
        elapsed = time.perf_counter() - t0
        self.step += 1
        record = {
            "step": self.step,
            "losses": [float(x) for x in losses],
            "loss_mean": float(losses[torch.isfinite(losses)].mean()) if torch.isfinite(losses).any() else float("nan"),
            "baseline": self.baseline,
            "grad_variance": variance,
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

    def evaluate_hard_mask(self) -> float:
        """Perplexity of the current hard mask on the validation windows (masked forward)."""
        from .evaluate import window_losses

        mask = self.current_mask()
        losses = []
        with self._autocast(), masked(self.model, self.adapter, self.space, mask, self.fill):
            for start in range(0, len(self.valid), 8):
                losses.append(window_losses(self.model, self.valid[start:start + 8]).double().cpu())
        return math.exp(float(torch.cat(losses).mean()))

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Write everything needed to continue the same trajectory, atomically."""
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step, "s_h": self.s_h, "s_c": self.s_c, "baseline": self.baseline,
            "generator": self.generator.get_state(), "history": self.history.state(),
            "config": dataclasses.asdict(self.config), "ratio": self.ratio, "seed": self.seed,
            "settings": self.settings, "status": self.status,
        }
        tmp = self.run_dir / f".{CHECKPOINT}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.run_dir / CHECKPOINT)
        self.write_status()

    def write_status(self) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.run_dir / STATUS, {
            "status": self.status, "step": self.step, "steps": self.config.steps, "ratio": self.ratio,
            "settings": self.settings, "error": self.error, "updated": time.time()})

    def load_checkpoint(self) -> bool:
        """Continue from run_dir's checkpoint if there is one; True if loaded."""
        path = self.run_dir / CHECKPOINT if self.run_dir else None
        if path is None or not path.is_file():
            return False
        state = torch.load(path, weights_only=False)
        saved = PGConfig(**state["config"])
        if saved != self.config or state["ratio"] != self.ratio or state["seed"] != self.seed:
            raise PrunerError(f"{path} belongs to a run with other settings; use a new run directory")
        self.step, self.s_h, self.s_c, self.baseline = state["step"], state["s_h"], state["s_c"], state["baseline"]
        self.generator.set_state(state["generator"])
        h = state["history"]
        self.history = RunHistory(h["steps"], h["snapshots"], h["evals"])
        return True

    # -- control --------------------------------------------------------------------------
    def _snapshot(self) -> None:
        probs = self.probabilities()
        self.history.append("snapshots", {"step": self.step, "heads": [t.clone() for t in probs.heads],
                                          "channels": [t.clone() for t in probs.channels]})

    def run(self, progress=None) -> None:
        """The loop, in the calling thread. `progress(record)` is called after every step."""
        cfg = self.config
        self.status = "running"
        self.write_status()
        try:
            if self.step == 0 and not self.history.snapshots:
                self._snapshot()
            while self.step < cfg.steps:
                while self._pause.is_set() and not self._stop.is_set():
                    self.status = "paused"
                    time.sleep(0.05)
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
                    self.history.append("evals", {"step": self.step, "ppl": self.evaluate_hard_mask()})
                if self.step % cfg.checkpoint_every == 0:
                    self.checkpoint()
                if progress:
                    progress(record)
            self.status = "finished"
            self.checkpoint()
        except Exception:  # noqa: BLE001 - a failed run keeps its traceback for the UI
            self.status, self.error = "failed", traceback.format_exc()
            self.write_status()
            raise

    def start(self, on_exit=None) -> threading.Thread:
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


# ---- glue for prune(): build a run from a loaded model and run it to the end ---------------

def build_run(loaded, space: PruningSpace, config, run_dir: Path | None = None) -> PGRun:
    """Tokenise the corpus, compute the init metric, and create (or reload) a run."""
    from .corpus import load_text
    from .windows import eval_windows, tokenize

    pg = config.pg
    train_ids = tokenize(loaded.tokenizer, load_text(config.data, "train"))
    blocks = training_blocks(train_ids, pg.seqlen, config.seed)
    valid = eval_windows(tokenize(loaded.tokenizer, load_text(config.data, "validation")), pg.seqlen, pg.eval_windows)
    init_scores = None if pg.init == "random" else metric_scores(loaded, space, config, pg.init_metric)
    fill = None
    if pg.bias_compensation:
        from .calibration import input_means
        from .methods import calibration_stats

        fill = input_means(calibration_stats(loaded, config))
    settings = {"model": loaded.spec, "method": "pg", "ratio": config.ratio, "granularity": config.granularity,
                "data": config.data, "seed": config.seed, "calib_windows": config.calib_windows,
                "pg": dataclasses.asdict(pg)}
    run = PGRun(loaded.model, loaded.adapter, space, config.ratio, pg, config.seed, blocks, valid,
                init_scores, run_dir, settings, fill)
    run.load_checkpoint()
    return run


def read_settings(run_dir: Path) -> dict:
    """The settings a run was started with (model, ratio, granularity, data, seed, pg knobs)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise PrunerError(f"no checkpoint at {path}: nothing to resume")
    return torch.load(path, weights_only=False)["settings"]


def metric_scores(loaded, space: PruningSpace, config, metric: str) -> tuple[list[Tensor], list[Tensor]]:
    from .methods import calibration_stats, flap_scores, magnitude_scores, wanda_sp_scores

    if metric == "magnitude":
        return magnitude_scores(loaded, space)
    stats = calibration_stats(loaded, config)
    return (wanda_sp_scores if metric == "wanda-sp" else flap_scores)(loaded, space, stats)


def run_pg_to_completion(loaded, space: PruningSpace, config, run_dir: Path | None = None):
    """Run (or continue) a search in the foreground with a progress bar; returns a Selection."""
    from tqdm.auto import tqdm

    from .methods import Selection

    run = build_run(loaded, space, config, run_dir or config.run_dir)
    bar = tqdm(total=run.config.steps, initial=run.step, desc="policy gradient", unit="step")

    def progress(record):
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss_mean']:.3f}", kept=f"{record['expected_kept_fraction']:.3f}")

    run.run(progress)
    bar.close()
    return selection_of(run, loaded, config)


def selection_of(run: PGRun, loaded, config):
    """The hard mask of a run's current probabilities as a method Selection; with
    `bias_compensation`, FLAP's bias terms for it from the calibration statistics."""
    from .methods import Selection, bias_compensation, calibration_stats

    mask = run.current_mask()
    updates = (bias_compensation(loaded, run.space, mask, calibration_stats(loaded, config))
               if run.config.bias_compensation else [])
    history = run.history.read()
    return Selection(mask, updates, extra={"pg": {
        "steps": run.step,
        "final_loss_mean": history["steps"][-1]["loss_mean"] if history["steps"] else None,
        "validation_ppl": history["evals"],
        "run_dir": str(run.run_dir) if run.run_dir else None,
    }})
