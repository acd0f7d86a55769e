"""Runs as the studio sees them: one heavy job at a time in a background thread, every run on disk.

A run directory (under `paths.runs_dir()`) holds
    status.json     status, step, settings, error (written atomically, read by the Runs page)
    checkpoint.safetensors   policy-gradient state (resumable; tensors and JSON only)
    model/          the pruned model and its report.json, written when a run finishes or stops
Jobs work on a private copy of the model: the cached model that pages read is never hooked or
modified. A job lets go of that copy and of its search when it ends: an ended run lives on disk
only (its record, checkpoint and model), and resuming it reads its checkpoint. Nothing here
touches Streamlit; pages only read a job's state.

One heavy thing at a time: a run's job, a Probe Pruning job, or one What-if computation
(`pruner.whatif`, the studio's `whatif` queue). What-if work waits while a job is going. A job
starts at once (no page waits), and its thread waits for the What-if computation in flight, if
any, before it copies the model; no new one begins until the job has ended.

A `ProbeJob` (the Probe page) runs a few batches of Probe Pruning next to the dense forward; it
takes the same heavy slot but keeps its results in memory (no run folder) and lets go of its
model copy when it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time
import traceback
import uuid
from pathlib import Path

from .config import PruneConfig
from .errors import PrunerError
from .fileio import inside
from .methods import check_config, get_method
from .methods.pg import build_run, selection_of, settings_of
from .models import REPORT_FILE, LoadedModel, private_copy, save_pruned
from .paths import runs_dir
from .pg.checkpoint import has_checkpoint, load_checkpoint, read_settings
from .pg.history import RunHistory
from .pg.run import PGRun
from .probe import ProbeConfig, build_pruner, evaluate_dynamic
from .prune import apply, prune, report
from .run_record import FINAL, LIVE, RunRecord, read_record
from .space import PruningSpace
from .whatif import WhatIfQueue, release_memory

MODEL_SUBDIR = "model"
SLOT_POLL_S = 0.5  # how often waiting What-if work looks whether the run has ended


def new_run_id(config: PruneConfig) -> str:
    """Sortable and readable: 20261122-014501-pg-r30-1a2b."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-r{round(config.ratio * 100):02d}-{uuid.uuid4().hex[:4]}"


class _Stopped(Exception):
    """Raised between two layers of a layer-by-layer run when Stop was pressed."""


class _Background:
    """What the studio's jobs share: a status, one daemon thread running the subclass's `_work`, and
    the turn it waits for (the studio's one-heavy-job rule) before it works on a private copy of the
    shared model."""

    _status: str
    _thread: threading.Thread | None
    _wait_turn = None
    loaded: LoadedModel | None

    @property
    def is_alive(self) -> bool:
        """True while the job works; its final status is set as the thread's last act on the run."""
        return bool(self._thread and self._thread.is_alive()) and self._status in LIVE

    @property
    def ended(self) -> bool:
        return self._status in FINAL

    def wait(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    def _spawn(self, name: str) -> None:
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _take_turn(self) -> None:
        """In the job's thread: wait for the turn, then take a private copy (hooks, swapped-in weights
        and pruning never touch the shared model)."""
        if self._wait_turn is not None:
            self._wait_turn()
        self.loaded = private_copy(self.loaded)


class Job(_Background):
    """One run of any method in a background thread, with a status the pages can poll.

    For policy gradient, `pg` is the live `PGRun` (history, pause/resume/stop). When the loop
    ends (finished or stopped) the current hard mask is sliced and saved to `<dir>/model`.
    A layer-by-layer run (an unstructured / N:M method, or any structured one with a
    reconstruction) appends each finished layer's record to `layers`; its progress counts layers.
    The job's `RunRecord` is the one writer of `<dir>/status.json`. `loaded` is the shared model
    until the job's turn comes (`wait_turn`), then the job's private copy of it. Once ended, the job
    drops its copy and its search (`loaded` and `pg` become None); its history is then read from disk.
    """

    def __init__(self, run_id: str, run_dir: Path, loaded: LoadedModel, config: PruneConfig, wait_turn=None):
        self.id, self.dir, self.loaded, self.config = run_id, Path(run_dir), loaded, config
        self._wait_turn = wait_turn  # called first in the job's thread: the studio's one-heavy-job rule
        self.pg: PGRun | None = None
        self._status = "created"
        self.error: str | None = None
        self.report: dict | None = None
        self.started = time.time()
        self._thread: threading.Thread | None = None
        self._stop_asked = False
        self.layers: list[dict] = []
        self.layerwise = get_method(config.method).sparse or config.reconstruct != "none"
        self.n_layers = len(loaded.adapter.layers(loaded.model))  # counted now: an ended job drops its model
        self._ended_at: tuple[int, int] | None = None  # (step, steps) when the job let go of its search
        self.record = RunRecord(self.dir, settings_of(loaded, config))

    # -- state read by pages ------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.pg is not None and self._status == "running":
            # the loop's own status while it goes; once it has ended, the job still slices and saves
            return {"created": "running", "running": "running", "paused": "paused"}.get(self.pg.status, "saving")
        return self._status

    def history(self) -> dict:
        pg = self.pg
        if pg is not None:
            return pg.history.read()
        return saved_history(self.dir) if self._ended_at else RunHistory().read()

    def progress(self) -> tuple[int, int]:
        """(done, total): search steps for policy gradient, else layers of a layer-by-layer run."""
        pg = self.pg
        if pg is not None:
            return pg.step, pg.config.steps
        if self._ended_at:
            return self._ended_at
        if self.layerwise:
            return (self.n_layers if self._status == "finished" else len(self.layers)), self.n_layers
        return (1, 1) if self._status == "finished" else (0, 1)

    def _layer_done(self, record: dict) -> None:
        self.layers.append(record)
        self._write()
        if self._stop_asked and self.pg is None:  # a search's Stop ends the search, then its result is refitted
            raise _Stopped  # a layer-by-layer run stops between layers, without a model

    def info(self) -> dict:
        status = self.status  # before the step: a run seen "paused" has no step in flight, its step is final
        step, steps = self.progress()
        return {"id": self.id, "dir": str(self.dir), "status": status, "step": step, "steps": steps,
                "settings": self.record.settings, "error": self.error,
                "has_model": (self.dir / MODEL_SUBDIR / REPORT_FILE).is_file(), "updated": time.time()}

    # -- control --------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin in a daemon thread (a job runs once; a stopped run resumes as a new job)."""
        if self.is_alive:
            raise PrunerError(f"run {self.id} is already going")
        self._status, self.error, self._stop_asked = "loading", None, False
        self.layers = []
        self._write()
        self._spawn(f"job-{self.id}")

    def pause(self) -> None:
        if self.pg:
            self.pg.pause()

    def resume(self) -> None:
        if self.pg:
            self.pg.resume()

    def stop(self) -> None:
        self._stop_asked = True  # also honoured when asked before the loop has started
        if self.pg:
            self.pg.stop()

    # -- the work -------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            self._take_turn()
            if self.config.method == "pg":
                ended = self._run_pg()
            else:
                self._status = "running"
                self._write()
                pruned, _, result = prune(self.loaded, self.config, on_layer=self._layer_done)
                self._status = "saving"
                self._save(pruned, result)
                ended = "finished"
        except _Stopped:
            ended = "stopped"
        except Exception as exc:  # noqa: BLE001 - a failed run keeps its reason for the Runs page
            ended = "failed"
            self.error = str(exc) if isinstance(exc, PrunerError) else traceback.format_exc()
        self._write(ended)
        self._ended_at = self.progress()
        self._status = ended  # pages that see a final status find everything on disk
        self.pg = self.loaded = None  # the model copy and the search: an ended run lives on disk
        release_memory()

    def _run_pg(self) -> str:
        """The PG loop, then slice and save its current hard mask; returns "finished" or "stopped"."""
        start = time.perf_counter()
        if self.pg is None:
            space = PruningSpace.from_model(self.loaded.model, self.loaded.adapter, self.config.granularity)
            self.pg = build_run(self.loaded, space, self.config, self.dir, on_status=lambda run: self._write())
        self._status = "running"
        self.pg.resume()  # a pause left over from before a stop does not carry into the new thread
        thread = self.pg.start()
        if self._stop_asked:
            self.pg.stop()
        thread.join()
        if self.pg.status == "failed":
            raise PrunerError(self.pg.error or "the search failed")
        ended = self.pg.status  # finished or stopped
        self._write()
        selection = selection_of(self.pg)
        pruned, selection = apply(self.loaded, self.config, self.pg.space, selection, on_layer=self._layer_done)
        self._save(pruned, report(self.loaded, self.config, self.pg.space, selection, pruned,
                                  time.perf_counter() - start))
        return ended

    def _save(self, pruned, result: dict) -> None:
        self.report = result
        save_pruned(pruned, self.loaded.tokenizer, self.dir / MODEL_SUBDIR, result, overwrite=True)

    def _write(self, status: str | None = None) -> None:
        step, steps = self.progress()
        self.record.write(status=status or self.status, step=step, steps=steps, error=self.error,
                          has_model=(self.dir / MODEL_SUBDIR / REPORT_FILE).is_file())


class ProbeJob(_Background):
    """A few batches of Probe Pruning, each timed against the dense forward, in a background thread.

    Validation windows of `seqlen` tokens of the config's corpus, `batches` batches of `batch_size`.
    `state()` is what the Probe page draws: per batch the kept heads and channels (0/1 matrices,
    layers x units), the two wall times, the probe's analytic FLOPs share and the NLLs.
    """

    def __init__(self, job_id: str, loaded: LoadedModel, config: ProbeConfig, batches: int, batch_size: int,
                 seqlen: int, wait_turn=None):
        if min(batches, batch_size) < 1 or seqlen < 2:
            raise PrunerError("a probe run needs at least one batch of one window of at least 2 tokens")
        self.id, self.loaded, self.config = job_id, loaded, config.validate()
        self.batches, self.batch_size, self.seqlen = batches, batch_size, seqlen
        self._status, self.error = "created", None
        self._results: list[dict] = []
        self.rows: list[dict] | None = None
        self._stop_asked = False
        self._thread: threading.Thread | None = None
        self._wait_turn = wait_turn  # called first in the job's thread: the studio's one-heavy-job rule

    @property
    def status(self) -> str:
        return self._status

    def progress(self) -> tuple[int, int]:
        return len(self._results), self.batches

    def state(self) -> dict:
        return {"id": self.id, "status": self._status, "error": self.error, "done": len(self._results),
                "total": self.batches, "batches": list(self._results), "rows": self.rows,
                "config": dataclasses.asdict(self.config), "batch_size": self.batch_size, "seqlen": self.seqlen}

    def start(self) -> None:
        self._status = "loading"
        self._spawn(f"probe-{self.id}")

    def stop(self) -> None:
        self._stop_asked = True

    def _work(self) -> None:
        from .windows import corpus_windows

        try:
            self._take_turn()
            windows = corpus_windows(self.loaded.tokenizer, self.config.data, "validation", self.seqlen,
                                     self.batches * self.batch_size)
            pruner = build_pruner(self.loaded, self.config, self.seqlen)
            self._status = "running"

            def on_batch(index: int, entry: dict) -> None:
                heads, channels = pruner.keep_masks(pruner.records[-1])
                probe = entry["probe"]
                self._results.append({"batch": index, "dense_s": entry["dense"]["seconds"],
                                      "probe_s": probe["seconds"], "dense_nll": entry["dense"]["nll"],
                                      "probe_nll": probe["nll"], "probe_flops_share": probe["flops"]["probe_share"],
                                      "flops_ratio": probe["flops"]["flops_ratio"],
                                      "achieved_ratio": probe["achieved_ratio"], "heads": heads, "channels": channels})

            result = evaluate_dynamic(self.loaded, windows, self.batch_size, {"probe": pruner}, on_batch=on_batch,
                                      should_stop=lambda: self._stop_asked)
            self.rows = result["rows"]
            ended = "stopped" if self._stop_asked and len(self._results) < self.batches else "finished"
        except Exception as exc:  # noqa: BLE001 - the page shows why
            ended = "failed"
            self.error = str(exc) if isinstance(exc, PrunerError) else traceback.format_exc()
        self.loaded = None  # the model copy: the results stay
        self._status = ended  # last: a page that sees a final status finds every result in place


class Studio:
    """Every run of this process plus those on disk, and the What-if queue; at most one heavy job
    (a run, or one What-if computation) at a time."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else runs_dir()
        self.jobs: dict[str, Job | ProbeJob] = {}
        self._lock = threading.RLock()
        self._slot = threading.Condition(self._lock)  # signalled when What-if work or a run's start ends
        self._whatif_busy = False  # a What-if computation holds its memory
        self.whatif = WhatIfQueue(self.whatif_slot)

    def folder(self, run_id: str) -> Path:
        """The folder of run `run_id`, strictly inside the runs folder (PrunerError otherwise)."""
        return inside(self.root, run_id, "run id")

    def active(self) -> Job | None:
        with self._lock:
            return next((j for j in self.jobs.values() if j.is_alive), None)

    def _refuse_if_busy(self) -> None:
        busy = self.active()
        if busy is not None:
            raise PrunerError(f"run {busy.id} is still going ({busy.status}); stop it or wait for it "
                              "before starting another: one heavy run at a time")

    @contextlib.contextmanager
    def whatif_slot(self, on_wait):
        """Hold the heavy slot for one What-if computation. Waits while a run is going, calling
        `on_wait(run_id)` (and `on_wait(None)` once it has the slot)."""
        with self._slot:
            while (busy := self.active()) is not None:
                on_wait(busy.id)
                self._slot.wait(SLOT_POLL_S)
            on_wait(None)
            self._whatif_busy = True
        try:
            yield
        finally:
            with self._slot:
                self._whatif_busy = False
                self._slot.notify_all()

    def _whatif_done(self) -> None:
        """A run's first act (in its thread): wait for the What-if computation in flight, if any."""
        with self._slot:
            self._slot.wait_for(lambda: not self._whatif_busy)

    def _launch(self, run_id: str, run_dir: Path, loaded: LoadedModel, config: PruneConfig) -> Job:
        """Register and start a job, unless a run is going. From here no What-if computation begins;
        the job waits for the one in flight before it copies the model."""
        with self._slot:
            self._refuse_if_busy()
            job = Job(run_id, run_dir, loaded, config, wait_turn=self._whatif_done)
            self.jobs[run_id] = job
            job.start()
        return job

    def start(self, loaded: LoadedModel, config: PruneConfig) -> Job:
        """Start a new run of `config` on a private copy of `loaded`."""
        config = check_config(dataclasses.replace(config, run_dir=None))
        self._refuse_if_busy()
        run_id = new_run_id(config)
        return self._launch(run_id, self.folder(run_id), loaded, config)

    def start_probe(self, loaded: LoadedModel, config: ProbeConfig, batches: int, batch_size: int,
                    seqlen: int) -> ProbeJob:
        """Start a Probe Pruning job on a private copy of `loaded` (it hooks and slices its model)."""
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-probe-r{round(config.ratio * 100):02d}-{uuid.uuid4().hex[:4]}"
        # checks the settings first; its thread waits for the What-if computation in flight, then copies the model
        job = ProbeJob(job_id, loaded, config, batches, batch_size, seqlen, wait_turn=self._whatif_done)
        with self._slot:
            self._refuse_if_busy()
            self.jobs[job_id] = job
            job.start()
        return job

    def get(self, run_id: str) -> Job | None:
        """The job of `run_id` while it has not ended, else None: an ended run is read from disk."""
        with self._lock:
            job = self.jobs.get(run_id)
            if not isinstance(job, Job):
                return None
            if job.ended:
                del self.jobs[run_id]
                return None
            return job

    def get_probe(self, job_id: str) -> ProbeJob | None:
        """A Probe Pruning job of this process (its results stay in memory after it ends)."""
        with self._lock:
            job = self.jobs.get(job_id)
        return job if isinstance(job, ProbeJob) else None

    def resume(self, run_id: str, load) -> Job:
        """Continue a stopped or interrupted policy-gradient run from its checkpoint.
        `load(spec)` returns the LoadedModel for the run's model spec (the page's cache).
        The new job continues from the run's checkpoint (an ended job keeps nothing in memory)."""
        self._refuse_if_busy()
        run_dir = self.folder(run_id)
        record = read_record(run_dir)
        method = (record.get("settings") or {}).get("method", "pg")
        if method != "pg":
            raise PrunerError(f"run {run_id} is a {method} run: only policy-gradient runs resume")
        if record.get("status") == "finished":
            raise PrunerError(f"run {run_id} has finished all its steps")
        if not has_checkpoint(run_dir):
            raise PrunerError(f"run {run_id} has no checkpoint to resume from")
        settings = read_settings(run_dir)
        config = PruneConfig.from_dict({k: v for k, v in settings.items() if k != "model"})
        return self._launch(run_id, run_dir, load(settings.get("model", "embedded")), config)

    def runs(self) -> list[dict]:
        """Every run directory, newest first, live jobs with their live state. A run whose
        status says it was going but that no job of this process holds was interrupted."""
        out = []
        if self.root.is_dir():
            for path in sorted(self.root.iterdir(), reverse=True):
                if path.name.startswith(".") or not (path / "status.json").is_file():
                    continue
                job = self.get(path.name)
                if job is not None:
                    info = job.info()
                else:
                    info = read_record(path) | {"id": path.name, "dir": str(path),
                                                "has_model": (path / MODEL_SUBDIR / REPORT_FILE).is_file()}
                    if info.get("status") in LIVE:
                        info["status"] = "interrupted"
                out.append(info)
        return out

    def delete(self, run_id: str) -> None:
        job = self.get(run_id)
        if job is not None and job.is_alive:
            raise PrunerError(f"run {run_id} is still going: stop it before deleting it")
        path = self.folder(run_id)
        if not (path / "status.json").is_file():
            raise PrunerError(f"no run {run_id} in {self.root}")
        shutil.rmtree(path)
        with self._lock:
            self.jobs.pop(run_id, None)


def saved_history(run_dir: Path) -> dict:
    """History of a run that no job holds (from its checkpoint), for reopening its charts.
    A damaged checkpoint raises a PrunerError; none gives an empty history."""
    ckpt = load_checkpoint(run_dir)
    return ckpt.history if ckpt is not None else RunHistory().read()


def saved_report(run_dir: Path) -> dict | None:
    path = Path(run_dir) / MODEL_SUBDIR / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
