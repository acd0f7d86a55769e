"""What-if work of the studio: quick prunings measured on validation windows, and the model cards
of the Compare page, one at a time.

A page says what it wants to show as a wish list of `WhatIf` requests, most wanted first
(`WhatIfQueue.submit`). One worker thread computes the first request whose result is not known yet,
keeps its small result dict (never the pruned model) in a bounded LRU, and goes on with the next.

- At most one computation in memory at a time: one worker, and each pruned copy is dropped (and its
  memory handed back to the system, `release_memory`) before the next is made.
- A newer wish list replaces the queued one: requests not yet started are forgotten. The request in
  flight finishes and is kept (a page often comes back to it); it is never computed twice.
- What-if work and a run never overlap: each computation holds the studio's heavy slot (`gate`).
  The slot waits while a run is going ("waiting for run X"); a run started meanwhile waits, in its
  own thread, for the one computation in flight before it copies the model.
- Calibration statistics are computed once per model (`calibration.calibration_stats` keeps them
  per model object); evaluation windows once per model and corpus.

Pages poll `result` and `state`; nothing here touches Streamlit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import PruneConfig
from .errors import PrunerError
from .evaluate import model_card, perplexity
from .models import REPORT_FILE, LoadedModel, load_model, private_copy
from .probe import GENERATION_HISTORY_SEQLEN, ProbeConfig, ProbePruner, build_pruner, dynamic_card
from .prune import prune
from .windows import corpus_windows

EVAL_SEQLEN, EVAL_WINDOWS, CALIB_WINDOWS = 128, 16, 32  # the windows a PG run evaluates on by default
PROBE_CALIB_WINDOWS = 32  # Probe Pruning's history for Compare: calibrated in seconds
RESULTS_KEPT = 256  # results in the LRU: each a few kB (perplexity and a per-layer table)
WINDOWS_KEPT = 4  # (model, corpus) pairs whose evaluation windows are kept


@dataclass(frozen=True)
class WhatIf:
    """One thing a What-if page can show; equal requests share one result.

    kind "prune": perplexity and report of pruning the model with `method` at `ratio`;
    kind "dense": perplexity of the model itself; kind "saved": perplexity of a run's saved model
    at `path` (its report's modification time `stamp` is part of the key: a rewritten model is
    measured again); with `card`, either gives `evaluate.model_card` (parameters, perplexity,
    prefill latency, decoding speed) instead; kind "probe": the model card of the model under
    Probe Pruning at `ratio` (`probe.dynamic_card`, history from PROBE_CALIB_WINDOWS train windows).
    `model`, `device`, `dtype` name the loaded model the way the studio's model cache does; every
    perplexity is on the first EVAL_WINDOWS windows of EVAL_SEQLEN tokens of the corpus `data`'s
    validation split."""

    kind: str
    model: str
    device: str
    dtype: str
    data: str
    method: str = ""
    ratio: float = 0.0
    granularity: str = ""
    stamp: float = 0.0
    reconstruct: str = "none"  # a pruning's `PruneConfig.reconstruct`
    card: bool = False  # dense / saved: the model card instead of the perplexity alone

    @classmethod
    def pruning(cls, model: str, device: str, dtype: str, data: str, method: str, ratio: float,
                granularity: str, reconstruct: str = "none") -> "WhatIf":
        return cls("prune", model, device, dtype, data, method, round(float(ratio), 6), granularity,
                   reconstruct=reconstruct)

    @classmethod
    def dense(cls, model: str, device: str, dtype: str, data: str, card: bool = False) -> "WhatIf":
        return cls("dense", model, device, dtype, data, card=card)

    @classmethod
    def saved(cls, path: str, device: str, dtype: str, data: str, card: bool = False) -> "WhatIf":
        report = Path(path) / REPORT_FILE
        return cls("saved", str(path), device, dtype, data, stamp=report.stat().st_mtime if report.is_file() else 0.0,
                   card=card)

    @classmethod
    def probe(cls, model: str, device: str, dtype: str, data: str, ratio: float) -> "WhatIf":
        return cls("probe", model, device, dtype, data, ratio=round(float(ratio), 6), card=True)

    def describe(self) -> str:
        if self.kind == "prune":
            return (f"{self.method} at ratio {self.ratio:.2f} ({self.granularity})"
                    + (f" + {self.reconstruct} reconstruction" if self.reconstruct != "none" else ""))
        if self.kind == "probe":
            return f"Probe Pruning at ratio {self.ratio:.2f}: size, perplexity and speed"
        what = "size, perplexity and speed" if self.card else "perplexity"
        if self.kind == "dense":
            return f"the dense model's {what}"
        return f"the {what} of the saved model {Path(self.model).parent.name or self.model}"

    def config(self) -> PruneConfig:
        return PruneConfig(method=self.method, ratio=self.ratio, granularity=self.granularity, data=self.data,
                           calib_windows=CALIB_WINDOWS, reconstruct=self.reconstruct)


def probe_comparison(loaded: LoadedModel, ratio: float, data: str) -> tuple[LoadedModel, ProbePruner]:
    """Compare's Probe Pruning at `ratio`: a pruner on a private copy of `loaded` (it hooks and slices
    its own modules), its history from PROBE_CALIB_WINDOWS train windows of `data` of
    GENERATION_HISTORY_SEQLEN tokens. The page's generation and the queue's card both use it, so
    they run the same settings and share one calibrated history."""
    hooked = private_copy(loaded)
    config = ProbeConfig(ratio=ratio, data=data, calib_windows=PROBE_CALIB_WINDOWS)
    return hooked, build_pruner(hooked, config, GENERATION_HISTORY_SEQLEN)


def measure(request: WhatIf, loaded: LoadedModel | None, windows: Callable[[LoadedModel], object]) -> dict:
    """The result of one request, a small dict: {"ppl"} and for a pruning also "achieved_ratio",
    "per_layer", "wall_time_s" and "layer_errors" (a reconstruction's per-layer records, else []);
    a card request's `evaluate.model_card`. The pruned (or loaded saved, or probe-hooked) model is
    dropped on return."""
    if request.kind in ("dense", "saved"):
        if request.kind == "saved":
            loaded = load_model(request.model, device=request.device, dtype=request.dtype)
        if request.card:
            return model_card(loaded.model, windows(loaded))
        return {"ppl": perplexity(loaded.model, windows(loaded))["ppl"]}
    if request.kind == "probe":
        hooked, pruner = probe_comparison(loaded, request.ratio, request.data)
        return dynamic_card(hooked, pruner, windows(loaded))
    if request.kind != "prune":
        raise PrunerError(f"unknown What-if request kind {request.kind!r}")
    pruned, _, report = prune(loaded, request.config())
    return {"ppl": perplexity(pruned, windows(loaded))["ppl"], "achieved_ratio": report["achieved_ratio"],
            "per_layer": report["per_layer"], "wall_time_s": report["wall_time_s"],
            "layer_errors": report.get("weight_update", {}).get("per_layer", [])}


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """Collect garbage, then hand the freed heap pages back to the system (glibc keeps them in its
    arenas otherwise, and a process that pruned once stays that large)."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM()


@contextlib.contextmanager
def no_gate(on_wait: Callable[[str | None], None]) -> Iterator[None]:
    """The heavy slot of a queue that shares its process with no run manager: always free."""
    yield


class WhatIfQueue:
    """What-if requests computed one at a time in a daemon thread; see the module docstring.

    `gate(on_wait)` is a context manager holding the process's heavy slot for one computation
    (`Studio.whatif_slot`); it calls `on_wait(run_id)` while it waits and `on_wait(None)` once in.
    `compute(request, loaded, windows)` makes one result (`measure`)."""

    def __init__(self, gate=no_gate, compute=measure, capacity: int = RESULTS_KEPT,
                 eval_seqlen: int = EVAL_SEQLEN, eval_count: int = EVAL_WINDOWS):
        self._gate, self._compute, self._capacity = gate, compute, capacity
        self._eval = (eval_seqlen, eval_count)
        self._cond = threading.Condition()
        self._wanted: list[tuple[WhatIf, LoadedModel | None]] = []  # queued, in order
        self._wish: set[WhatIf] = set()  # the last wish list whole: its results are not evicted
        self._results: OrderedDict[WhatIf, dict] = OrderedDict()
        self._windows: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._running: WhatIf | None = None
        self._waiting_for: str | None = None
        self._thread: threading.Thread | None = None
        self.computed = 0  # computations made by this queue (results, errors included)

    # -- asked by pages -------------------------------------------------------------------------
    def submit(self, wanted: list[WhatIf], loaded: LoadedModel | None) -> None:
        """Replace the queued wish list by `wanted` (most wanted first) on the model `loaded`
        (None where every request is of a saved model). Known results and the request in flight
        are not queued again; a submit equal to the queue changes nothing. Results of `wanted`
        stay kept (beyond the capacity if need be) until a later wish list leaves them out."""
        with self._cond:
            queue, seen = [], set()
            for request in wanted:
                if request not in seen and request not in self._results and request != self._running:
                    queue.append((request, loaded))
                seen.add(request)
            self._wanted, self._wish = queue, seen
            if queue and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._work, name="whatif", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def result(self, request: WhatIf) -> dict | None:
        """The result of `request` (a dict, {"error": message} for a failed one), or None if not known."""
        with self._cond:
            found = self._results.get(request)
            if found is not None:
                self._results.move_to_end(request)
            return found

    def state(self) -> dict:
        """What the worker does: "running" (the request in flight, or None), "queued" (requests waiting,
        in order), "waiting_for" (the run it waits for, or None)."""
        with self._cond:
            return {"running": self._running, "queued": [r for r, _ in self._wanted],
                    "waiting_for": self._waiting_for}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is running or queued (for scripts and tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running is None and not self._wanted, timeout)

    # -- the worker -----------------------------------------------------------------------------
    def _waiting(self, run_id: str | None) -> None:
        self._waiting_for = run_id

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._wanted))
            with self._gate(self._waiting):
                with self._cond:  # the wish list may have changed while the slot was taken
                    if not self._wanted:
                        continue
                    request, loaded = self._wanted.pop(0)
                    self._running = request
                start = time.perf_counter()
                try:
                    result = self._compute(request, loaded, lambda model: self._eval_windows(request, model))
                except PrunerError as exc:
                    result = {"error": str(exc)}
                except Exception as exc:  # noqa: BLE001 - the page shows why; the worker goes on
                    traceback.print_exc()
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    loaded = None
                    release_memory()
                print(f"whatif: computed {request.describe()} in {time.perf_counter() - start:.1f} s"
                      + (f" ({result['error']})" if "error" in result else ""), file=sys.stderr, flush=True)
                with self._cond:
                    self._results[request] = result
                    self._evict()
                    self._running = None
                    self.computed += 1
                    self._cond.notify_all()

    def _evict(self) -> None:
        """Forget the least recently used results beyond the capacity, except those the last wish
        list asked for (a page waiting for more results than the capacity still gets them all)."""
        extra = len(self._results) - self._capacity
        for request in [r for r in self._results if r not in self._wish][:max(extra, 0)]:
            del self._results[request]

    def _eval_windows(self, request: WhatIf, loaded: LoadedModel):
        """The validation windows of (model, corpus), tokenised once."""
        key = (request.model, request.data)
        with self._cond:
            found = self._windows.get(key)
        if found is None:
            seqlen, count = self._eval
            found = corpus_windows(loaded.tokenizer, request.data, "validation", seqlen, count)
            with self._cond:
                self._windows[key] = found
                while len(self._windows) > WINDOWS_KEPT:
                    self._windows.popitem(last=False)
        return found


def describe_state(state: dict) -> str:
    """One line for a page: what is computed now, what waits, and why."""
    running, queued, run = state["running"], state["queued"], state["waiting_for"]
    if run is not None:
        return (f"Waiting for run `{run}` to end (one heavy job at a time); "
                f"{len(queued)} What-if computation(s) queued.")
    if running is None and not queued:
        return "Idle."
    parts = [f"Computing {running.describe()}"] if running is not None else []
    if queued:
        more = f" and {len(queued) - 1} more" if len(queued) > 1 else ""
        parts.append(f"next: {queued[0].describe()}{more} (a newer change replaces what is queued)")
    return "; ".join(parts) + "."


def wait_for(queue: WhatIfQueue, requests: list[WhatIf], loaded: LoadedModel | None,
             timeout: float = 600.0, poll_s: float = 0.05) -> list[dict]:
    """Submit `requests` and wait for all their results (scripts and tests; pages poll instead)."""
    deadline = time.monotonic() + timeout
    while True:
        results = [queue.result(r) for r in requests]
        if all(r is not None for r in results):
            return results
        if time.monotonic() > deadline:
            raise PrunerError(f"What-if results not ready after {timeout:.0f} s")
        queue.submit(requests, loaded)
        time.sleep(poll_s)
