"""Runs as the studio sees them: one heavy job at a time in a background thread, every run on disk.

A run directory (under `paths.runs_dir()`) holds
    status.json     status, step, settings, error (written atomically, read by the Runs page)
    checkpoint.safetensors   policy-gradient state (resumable; tensors and JSON only)
    model/          the pruned model and its report.json, written when a run finishes or stops
Jobs work on a private copy of the model: the cached model that pages read is never hooked or
modified. Nothing here touches Streamlit; pages only read a job's state.
"""

from __future__ import annotations

import copy
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
from .models import REPORT_FILE, LoadedModel, save_pruned
from .paths import runs_dir
from .pg.checkpoint import has_checkpoint, load_checkpoint, read_settings
from .pg.history import RunHistory
from .pg.run import PGRun
from .prune import apply, prune, report
from .run_record import LIVE, RunRecord, read_record
from .space import PruningSpace

MODEL_SUBDIR = "model"


def new_run_id(config: PruneConfig) -> str:
    """Sortable and readable: 20261122-014501-pg-r30-1a2b."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.method}-r{round(config.ratio * 100):02d}-{uuid.uuid4().hex[:4]}"


def private_copy(loaded: LoadedModel) -> LoadedModel:
    """The same model in new memory, so hooks and pruning never touch the shared one."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))


class _Stopped(Exception):
    """Raised between two layers of a layer-by-layer run when Stop was pressed."""


class Job:
    """One run of any method in a background thread, with a status the pages can poll.

    For policy gradient, `pg` is the live `PGRun` (history, pause/resume/stop). When the loop
    ends (finished or stopped) the current hard mask is sliced and saved to `<dir>/model`.
    A layer-by-layer run (an unstructured / N:M method, or any structured one with a
    reconstruction) appends each finished layer's record to `layers`; its progress counts layers.
    The job's `RunRecord` is the one writer of `<dir>/status.json`.
    """

    def __init__(self, run_id: str, run_dir: Path, loaded: LoadedModel, config: PruneConfig):
        self.id, self.dir, self.loaded, self.config = run_id, Path(run_dir), loaded, config
        self.pg: PGRun | None = None
        self._status = "created"
        self.error: str | None = None
        self.report: dict | None = None
        self.started = time.time()
        self._thread: threading.Thread | None = None
        self._stop_asked = False
        self.layers: list[dict] = []
        self.layerwise = get_method(config.method).sparse or config.reconstruct != "none"
        self.record = RunRecord(self.dir, settings_of(loaded, config))

    # -- state read by pages ------------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.pg is not None and self._status == "running":
            # the loop's own status while it goes; once it has ended, the job still slices and saves
            return {"created": "running", "running": "running", "paused": "paused"}.get(self.pg.status, "saving")
        return self._status

    @property
    def is_alive(self) -> bool:
        """True while the job works; its final status is set as the thread's very last act."""
        return bool(self._thread and self._thread.is_alive()) and self._status in LIVE

    def history(self) -> dict:
        return self.pg.history.read() if self.pg else RunHistory().read()

    def progress(self) -> tuple[int, int]:
        """(done, total): search steps for policy gradient, else layers of a layer-by-layer run."""
        if self.pg:
            return self.pg.step, self.pg.config.steps
        if self.layerwise:
            total = len(self.loaded.adapter.layers(self.loaded.model))
            return (total if self._status == "finished" else len(self.layers)), total
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
        """Begin (or continue after a stop) in a daemon thread."""
        if self.is_alive:
            raise PrunerError(f"run {self.id} is already going")
        self._status, self.error, self._stop_asked = "loading", None, False
        self.layers = []
        self._write()
        self._thread = threading.Thread(target=self._work, name=f"job-{self.id}", daemon=True)
        self._thread.start()

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

    def wait(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)

    # -- the work -------------------------------------------------------------------------------
    def _work(self) -> None:
        try:
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
        self._status = ended  # last: pages that see a final status find everything on disk

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


class Studio:
    """Every run of this process plus those on disk; at most one heavy job at a time."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else runs_dir()
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

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

    def start(self, loaded: LoadedModel, config: PruneConfig) -> Job:
        """Start a new run of `config` on a private copy of `loaded`."""
        config = check_config(dataclasses.replace(config, run_dir=None))
        self._refuse_if_busy()
        run_id = new_run_id(config)
        job = Job(run_id, self.folder(run_id), private_copy(loaded), config)
        with self._lock:
            self.jobs[run_id] = job
        job.start()
        return job

    def get(self, run_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(run_id)

    def resume(self, run_id: str, load) -> Job:
        """Continue a stopped or interrupted policy-gradient run from its checkpoint.
        `load(spec)` returns the LoadedModel for the run's model spec (the page's cache)."""
        self._refuse_if_busy()
        job = self.get(run_id)
        if job is None:
            run_dir = self.folder(run_id)
            if not has_checkpoint(run_dir):
                raise PrunerError(f"run {run_id} has no checkpoint to resume from")
            settings = read_settings(run_dir)
            config = PruneConfig.from_dict({k: v for k, v in settings.items() if k != "model"})
            job = Job(run_id, run_dir, private_copy(load(settings.get("model", "embedded"))), config)
            with self._lock:
                self.jobs[run_id] = job
        if job.config.method != "pg":
            raise PrunerError(f"run {run_id} is a {job.config.method} run: only policy-gradient runs resume")
        if job.pg is not None and job.pg.step >= job.pg.config.steps:
            raise PrunerError(f"run {run_id} has finished all its steps")
        job.start()
        return job

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
